"""Stand-in for the ``slicer`` package of a running Slicer: only ``slicer.app``, the application object that
Slicer's real ``util.py`` and ``packaging.py`` (copied beside this file by the test) call into.

Its ``processEvents`` runs the ``qt.QTimer.singleShot`` callbacks that are due, so the real non-blocking pip
path of packaging.py (reader thread + QTimer polling) runs as it does in Slicer.
"""
import heapq
import itertools
import time

_order = itertools.count()


class _MainWindow:
    objectName = "qSlicerMainWindow"


class _Application:
    applicationName = "Slicer"

    def __init__(self):
        self._timers = []  # (due time, order, callback)
        self._mainWindow = _MainWindow()

    def testingEnabled(self):
        return False

    def thread(self):
        import qt

        return qt.MAIN_THREAD

    def topLevelWidgets(self):
        return [self._mainWindow]

    def schedule(self, msec, callback):
        heapq.heappush(self._timers, (time.monotonic() + msec / 1000.0, next(_order), callback))

    def processEvents(self):
        now = time.monotonic()
        due = []
        while self._timers and self._timers[0][0] <= now:
            due.append(heapq.heappop(self._timers)[2])
        for callback in due:
            callback()


app = _Application()
