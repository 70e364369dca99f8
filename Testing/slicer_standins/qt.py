"""Stand-in for Slicer's ``qt`` (PythonQt) module: what ``slicer.util`` and ``slicer.packaging`` touch.

Widgets accept any call and attribute (the progress dialog is built and "shown" but nothing is drawn);
``QTimer.singleShot`` schedules on ``slicer.app``'s event queue; the override cursor is tracked so a test can
see that it is restored; ``QMessageBox`` carries the standard button values.
"""


class _AnyClassAttribute(type):
    def __getattr__(cls, name):  # Qt.WindowCloseButtonHint, QFont.TypeWriter, …
        return Anything()


class Anything(int, metaclass=_AnyClassAttribute):
    """Any attribute, any call, falsy, usable as a flag: enough to build, lay out and show a widget."""

    def __new__(cls, *args, **kwargs):
        return int.__new__(cls, 0)

    def __getattr__(self, name):
        return Anything()

    def __call__(self, *args, **kwargs):
        return Anything()


MAIN_THREAD = object()
CURSORS = []  # the override cursor stack


class QThread(Anything):
    @staticmethod
    def currentThread():
        return MAIN_THREAD

    @staticmethod
    def msleep(msec):
        import time

        time.sleep(msec / 1000.0)


class QTimer(Anything):
    @staticmethod
    def singleShot(msec, callback):
        import slicer

        slicer.app.schedule(msec, callback)


class QApplication(Anything):
    @staticmethod
    def setOverrideCursor(cursor):
        CURSORS.append(cursor)

    @staticmethod
    def restoreOverrideCursor():
        if CURSORS:
            CURSORS.pop()

    @staticmethod
    def overrideCursor():
        return None


class QMessageBox(Anything):
    Ok = 0x00000400
    Yes = 0x00004000
    No = 0x00010000
    Cancel = 0x00400000
    Retry = 0x00080000
    Close = 0x00200000
    Information = 1
    Warning = 2
    Critical = 3
    Question = 4


class Qt(Anything):
    BusyCursor = 16
    WaitCursor = 3


def __getattr__(name):  # QDialog, QLabel, QVBoxLayout, QProgressBar, QPlainTextEdit, QShortcut, QFont, …
    return Anything
