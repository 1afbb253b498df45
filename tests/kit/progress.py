"""``Recorder``: a retraining's Progress (remote/pipeline.py) that keeps what it is told."""


class Recorder:
    """The states entered and their messages, in order, and the last value of each figure."""

    def __init__(self):
        self.states, self.messages, self.figures = [], [], {}

    def enter(self, state, message):
        self.states.append(state)
        self.messages.append(message)

    def record(self, name, value):
        self.figures[name] = value
