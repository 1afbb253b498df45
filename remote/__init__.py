"""Retraining: data staging, label making (phase retrieval), training, executors, and the
service that runs it all when $(P)ml:Retrain is written."""
