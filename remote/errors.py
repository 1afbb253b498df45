"""The errors a retraining ends in: ``RetrainError`` (its message goes to ml:Message) and
``Aborted`` (ml:Abort came)."""


class RetrainError(RuntimeError):
    pass


class Aborted(RetrainError):
    pass
