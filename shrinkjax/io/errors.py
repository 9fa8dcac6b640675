"""Errors for bad model/data files: always name the file and what is wrong with it."""


class ModelFileError(ValueError):
    def __init__(self, path, what: str):
        super().__init__(f"{path}: {what}")
        self.path = str(path)
