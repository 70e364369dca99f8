"""Stand-in for Slicer's ``ctk`` module. ``ctkMessageBox`` (what ``slicer.util.messageBox`` shows for every
confirmation, error and information popup) records what it showed in ``DIALOGS`` and answers from
``ANSWERS`` (a list of button names the test scripts: "ok", "cancel", "yes", "no"; "ok" when empty)."""
import qt

DIALOGS = []
ANSWERS = []


class ctkMessageBox:
    def __init__(self, parent=None):
        self.text = ""
        self.windowTitle = ""
        self.detailedText = ""
        self.icon = None
        self.standardButtons = None

    def __getattr__(self, name):  # any other property that messageBox sets
        return None

    def deleteLater(self):
        pass

    def exec_(self):
        answer = ANSWERS.pop(0) if ANSWERS else "ok"
        DIALOGS.append({"title": self.windowTitle.strip(), "text": self.text, "detailedText": self.detailedText,
                        "icon": self.icon, "answer": answer})
        return {"ok": qt.QMessageBox.Ok, "cancel": qt.QMessageBox.Cancel, "yes": qt.QMessageBox.Yes,
                "no": qt.QMessageBox.No}[answer]


def __getattr__(name):  # ctkCollapsibleButton, …
    return qt.Anything
