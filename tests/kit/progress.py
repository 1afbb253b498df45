"""``Recorder``: a retraining's Progress (remote/pipeline.py) that keeps what it is told."""


class Recorder:
    """The states entered, in order, and the last value of each figure."""

    def __init__(self):
        self.states, self.figures = [], {}

    def enter(self, state, message):
        self.states.append(state)

    def record(self, name, value):
        self.figures[name] = value
