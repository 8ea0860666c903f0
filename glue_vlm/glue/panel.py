"""The VLM Classifier dock panel: widgets bound to a :class:`ClassifierState`.

Every choice lives in the state; the widgets only show it (``autoconnect_callbacks_to_qt``
binds a widget named ``<kind>_<property>`` to the state's property). The run happens in
:class:`~glue_vlm.glue.runner.BackgroundRun`; problems end as one line in the panel,
with details on request, never as a dialog.
"""

from __future__ import annotations

import traceback
from types import SimpleNamespace

from echo.qt import autoconnect_callbacks_to_qt
from qtpy import QtCore, QtGui, QtWidgets

from .runner import USER_ERRORS, BackgroundRun, RunOutcome, RunPlan, one_line
from .state import PREVIEW_COUNT, ClassifierState

__all__ = ["ClassifierPanel", "OBJECT_NAME"]

OBJECT_NAME = "glue_vlm_panel"
THUMB = 72
#: state properties whose change makes the preview stale
PREVIEW_INPUTS = ("catalog", "rows_from", "subset", "n_rows", "source_kind", "image",
                  "image_att", "positions", "x_att", "y_att", "ra_att", "dec_att", "size",
                  "cube", "cube_att", "path_att", "base_dir", "stretch", "interval",
                  "engine_kind", "engine_spec")


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    value = int(round(value))
    return f"{value // 60} min {value % 60:02d} s" if value >= 60 else f"{value} s"


class ClassifierPanel(QtWidgets.QDockWidget):
    """Choose rows, imaging, task and engine; preview; classify; use the results."""

    #: a run was created and is about to start (connect to its signals here)
    run_created = QtCore.Signal(object)

    def __init__(self, session, data_collection, parent=None):
        super().__init__("VLM Classifier", parent)
        self.setObjectName(OBJECT_NAME)
        self.state = ClassifierState(data_collection, session)
        self.run: BackgroundRun | None = None
        self.last_outcome: RunOutcome | None = None
        self._estimators: list = []  # running cost estimates (threads kept alive)
        self.ui = SimpleNamespace()
        self._rows: dict[str, tuple[QtWidgets.QFormLayout, QtWidgets.QWidget]] = {}
        self._build()
        self._connections = autoconnect_callbacks_to_qt(self.state, self.ui)
        self._bind_text_areas()
        self._preview_timer = QtCore.QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(200)
        self._preview_timer.timeout.connect(self.refresh_preview)
        for name in PREVIEW_INPUTS:
            self.state.add_callback(name, self._schedule_preview)
        for name in ("rows_from", "source_kind", "positions", "engine_kind"):
            self.state.add_callback(name, self._update_visibility)
        for name in ("n_rows", "rows_note", "counts", "estimate"):
            self.state.add_callback(name, self._update_labels)
        self._update_visibility()
        self._update_labels()
        self.refresh_preview()
        app = QtWidgets.QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    # -- layout ---------------------------------------------------------------------
    def _widget(self, kind: str, name: str, widget):
        setattr(self.ui, f"{kind}_{name}", widget)
        return widget

    def _form(self, title: str, layout: QtWidgets.QVBoxLayout) -> QtWidgets.QFormLayout:
        box = QtWidgets.QGroupBox(title)
        form = QtWidgets.QFormLayout(box)
        form.setFieldGrowthPolicy(QtWidgets.QFormLayout.AllNonFixedFieldsGrow)
        layout.addWidget(box)
        return form

    def _row(self, form, label: str, widget, key: str | None = None):
        form.addRow(label, widget)
        if key:
            self._rows[key] = (form, widget)
        return widget

    def _build(self):
        body = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(body)
        combo = QtWidgets.QComboBox
        line = QtWidgets.QLineEdit

        form = self._form("Rows", layout)
        self._row(form, "Catalog", self._widget("combosel", "catalog", combo()))
        self._row(form, "Classify", self._widget("combosel", "rows_from", combo()))
        self._row(form, "Subset", self._widget("combosel", "subset", combo()), "subset")
        self.rows_label = self._row(form, "", QtWidgets.QLabel())
        self.rows_label.setWordWrap(True)

        form = self._form("Stamps", layout)
        self._row(form, "Source", self._widget("combosel", "source_kind", combo()))
        self._row(form, "Image", self._widget("combosel", "image", combo()), "image")
        self._row(form, "Pixels", self._widget("combosel", "image_att", combo()), "image_att")
        self._row(form, "Positions", self._widget("combosel", "positions", combo()),
                  "positions")
        for name, label in (("x_att", "x column"), ("y_att", "y column"),
                            ("ra_att", "RA column"), ("dec_att", "Dec column")):
            self._row(form, label, self._widget("combosel", name, combo()), name)
        size = self._row(form, "Cutout size", self._widget("text", "size", line()), "size")
        size.setToolTip("pixels (64) or an angle (20 arcsec)")
        self._row(form, "Stamp cube", self._widget("combosel", "cube", combo()), "cube")
        self._row(form, "Cube data", self._widget("combosel", "cube_att", combo()), "cube_att")
        self._row(form, "Path column", self._widget("combosel", "path_att", combo()),
                  "path_att")
        self._row(form, "Relative to", self._widget("text", "base_dir", line()), "base_dir")
        stretch = QtWidgets.QHBoxLayout()
        stretch.addWidget(self._widget("combosel", "stretch", combo()))
        stretch.addWidget(self._widget("combosel", "interval", combo()))
        form.addRow("Stretch", stretch)

        self.preview_box = QtWidgets.QGroupBox("Preview: the first stamps as the model sees them")
        grid = QtWidgets.QGridLayout(self.preview_box)
        self.thumbnails = []
        for i in range(PREVIEW_COUNT):
            thumb = QtWidgets.QLabel()
            thumb.setFixedSize(THUMB, THUMB)
            thumb.setAlignment(QtCore.Qt.AlignCenter)
            thumb.setStyleSheet("background: #202020; color: #c0c0c0; font-size: 9px")
            grid.addWidget(thumb, i // 4, i % 4)
            self.thumbnails.append(thumb)
        self.preview_note = QtWidgets.QLabel()
        self.preview_note.setWordWrap(True)
        grid.addWidget(self.preview_note, 2, 0, 1, 4)
        layout.addWidget(self.preview_box)

        form = self._form("Task", layout)
        self._row(form, "Task", self._widget("combosel", "task_preset", combo()))
        self._row(form, "Name", self._widget("text", "task_slug", line()))
        self.prompt_edit = self._row(form, "Prompt", QtWidgets.QPlainTextEdit())
        self.labels_edit = self._row(form, "Labels", QtWidgets.QPlainTextEdit())
        self.labels_edit.setToolTip("one label a line: name: description")
        for edit in (self.prompt_edit, self.labels_edit):
            edit.setFixedHeight(72)
        files = QtWidgets.QHBoxLayout()
        for text, slot in (("Load…", self._load_task), ("Save…", self._save_task)):
            button = QtWidgets.QPushButton(text)
            button.clicked.connect(slot)
            files.addWidget(button)
        files.addStretch()
        form.addRow("", files)

        form = self._form("Engine", layout)
        self._row(form, "Engine", self._widget("combosel", "engine_kind", combo()))
        self._row(form, "Model", self._widget("text", "model", line()))
        self._row(form, "Server URL", self._widget("text", "base_url", line()), "base_url")
        key = self._row(form, "API key", self._widget("text", "api_key", line()), "api_key")
        key.setEchoMode(QtWidgets.QLineEdit.Password)
        key.setPlaceholderText("from OPENAI_API_KEY if empty (never saved)")
        self._row(form, "Detail", self._widget("combosel", "detail", combo()), "detail")
        self._row(form, "Device", self._widget("text", "device", line()), "device")
        self._row(form, "Mode", self._widget("combosel", "local_mode", combo()), "local_mode")
        spin = QtWidgets.QSpinBox()
        spin.setRange(1, 512)
        self._row(form, "Batch size", self._widget("value", "batch_size", spin), "batch_size")
        self._row(form, "Engine class", self._widget("text", "engine_spec", line()),
                  "engine_spec")
        store = self._row(form, "Result store", self._widget("text", "store_path", line()))
        store.setPlaceholderText(str(self.state.store_location()))
        button = QtWidgets.QPushButton("Estimate the cost")
        button.clicked.connect(self.estimate_cost)
        form.addRow("", button)
        self.estimate_label = QtWidgets.QLabel()
        self.estimate_label.setWordWrap(True)
        form.addRow(self.estimate_label)

        run = QtWidgets.QGroupBox("Run")
        grid = QtWidgets.QGridLayout(run)
        self.classify_button = QtWidgets.QPushButton("Classify")
        self.classify_button.clicked.connect(self.classify)
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setFormat("")  # "done / total" once a run starts
        self.progress.setValue(0)
        self.progress_label = QtWidgets.QLabel()
        self.status = QtWidgets.QLabel()
        self.status.setWordWrap(True)
        # wrapped labels get too little height in a dock; keep room for three lines
        self.status.setMinimumHeight(self.status.fontMetrics().lineSpacing() * 3)
        self.status.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
        self.details_button = QtWidgets.QToolButton()
        self.details_button.setText("Details")
        self.details_button.setCheckable(True)
        self.details_button.setVisible(False)
        self.details = QtWidgets.QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setVisible(False)
        self.details_button.toggled.connect(self.details.setVisible)
        grid.addWidget(self.classify_button, 0, 0)
        grid.addWidget(self.cancel_button, 0, 1)
        grid.addWidget(self.progress, 1, 0, 1, 2)
        grid.addWidget(self.progress_label, 2, 0, 1, 2)
        grid.addWidget(self.status, 3, 0, 1, 2)  # the full width: fewer wrapped lines
        grid.addWidget(self.details_button, 4, 1, QtCore.Qt.AlignRight)
        grid.addWidget(self.details, 5, 0, 1, 2)

        form = self._form("Results", layout)
        self.counts_label = self._row(form, "Counts", QtWidgets.QLabel())
        self.counts_label.setWordWrap(True)
        button = QtWidgets.QPushButton("Create a subset per class")
        button.clicked.connect(self.subsets_per_class)
        form.addRow("", button)
        least = QtWidgets.QHBoxLayout()
        button = QtWidgets.QPushButton("Select the least confident")
        button.clicked.connect(self.select_least_confident)
        spin = QtWidgets.QDoubleSpinBox()
        spin.setRange(0.0, 1.0)
        spin.setSingleStep(0.05)
        least.addWidget(button)
        least.addWidget(QtWidgets.QLabel("below"))
        least.addWidget(self._widget("value", "threshold", spin))
        form.addRow("", least)
        truth = QtWidgets.QHBoxLayout()
        truth.addWidget(self._widget("combosel", "truth_att", combo()), 1)
        button = QtWidgets.QPushButton("Confusion matrix")
        button.clicked.connect(self.show_confusion)
        truth.addWidget(button)
        form.addRow("Truth", truth)
        self.confusion_text = QtWidgets.QPlainTextEdit()
        self.confusion_text.setReadOnly(True)
        self.confusion_text.setFont(QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.FixedFont))
        self.confusion_text.setVisible(False)
        form.addRow(self.confusion_text)
        review = QtWidgets.QHBoxLayout()
        review.addWidget(self._widget("combosel", "review_label", combo()), 1)
        button = QtWidgets.QPushButton("Set for selected rows")
        button.clicked.connect(self.review_selected)
        review.addWidget(button)
        form.addRow("Review", review)

        layout.addStretch()
        self.scroll = QtWidgets.QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarAlwaysOff)
        self.scroll.setWidget(body)
        outer = QtWidgets.QWidget()
        column = QtWidgets.QVBoxLayout(outer)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.scroll, 1)
        column.addWidget(run)  # always in view: Classify, Cancel, progress, status
        self.setWidget(outer)

    def _bind_text_areas(self):
        """Two-way binding for the multi-line task fields (echo binds line edits)."""
        for edit, name in ((self.prompt_edit, "task_prompt"), (self.labels_edit, "task_labels")):
            def to_state(edit=edit, name=name):
                if getattr(self.state, name) != edit.toPlainText():
                    setattr(self.state, name, edit.toPlainText())

            def to_widget(value, edit=edit):
                if edit.toPlainText() != value:
                    edit.setPlainText(value)

            edit.textChanged.connect(to_state)
            self.state.add_callback(name, to_widget)
            to_widget(getattr(self.state, name))

    def _update_visibility(self, *args):
        state = self.state
        image, kind = state.source_kind == "image", state.engine_kind
        visible = {
            "subset": state.rows_from == "subset",
            "image": image, "image_att": image, "positions": image, "size": image,
            "x_att": image and state.positions == "pixel",
            "y_att": image and state.positions == "pixel",
            "ra_att": image and state.positions == "sky",
            "dec_att": image and state.positions == "sky",
            "cube": state.source_kind == "cube", "cube_att": state.source_kind == "cube",
            "path_att": state.source_kind == "paths", "base_dir": state.source_kind == "paths",
            "base_url": kind == "openai-compatible",
            "api_key": kind in ("gpt-4o", "openai-compatible"),
            "detail": kind in ("gpt-4o", "openai-compatible"),
            "device": kind == "local", "local_mode": kind == "local",
            "batch_size": kind in ("local", "plugin"), "engine_spec": kind == "plugin",
        }
        for key, (form, widget) in self._rows.items():
            form.setRowVisible(widget, visible.get(key, True))

    def _update_labels(self, *args):
        state = self.state
        self.rows_label.setText(f"{state.n_rows} rows to classify" if state.n_rows
                                else state.rows_note)
        self.counts_label.setText(state.counts or "no results yet")
        self.estimate_label.setText(state.estimate or "cost: not estimated yet")

    # -- messages ---------------------------------------------------------------------
    def show_status(self, text: str, details: str = "", error: bool = False):
        """One line in the panel; ``details`` (a traceback, say) behind a button."""
        self.status.setText(text)
        self.status.setStyleSheet("color: #b00020" if error else "")
        self.details.setPlainText(details)
        self.details_button.setVisible(bool(details))
        if not details:
            self.details_button.setChecked(False)

    def _attempt(self, action, done: str | None = None):
        """Run ``action``; a failure becomes one line in the panel. Returns its value."""
        try:
            value = action()
        except USER_ERRORS as exc:
            self.show_status(one_line(exc), error=True)
            return None
        except Exception as exc:  # noqa: BLE001 - never a traceback dialog
            self.show_status(one_line(exc), traceback.format_exc(), error=True)
            return None
        if done:
            self.show_status(done)
        return value

    # -- preview ----------------------------------------------------------------------
    def _schedule_preview(self, *args):
        self._preview_timer.start()

    def refresh_preview(self):
        """Show the first stamps exactly as the engine will get them."""
        for thumb in self.thumbnails:
            thumb.clear()
        try:
            stamps = self.state.preview()
        except Exception as exc:  # noqa: BLE001 - shown in the preview box
            self.preview_note.setText(one_line(exc))
            return
        for thumb, stamp in zip(self.thumbnails, stamps):
            if stamp.pixels is None:
                thumb.setText(f"row {stamp.row}\n{stamp.error or 'no stamp'}")
                thumb.setWordWrap(True)
                continue
            pixels = stamp.pixels
            height, width = pixels.shape[:2]
            image = QtGui.QImage(pixels.tobytes(), width, height, 3 * width,
                                 QtGui.QImage.Format_RGB888)
            thumb.setPixmap(QtGui.QPixmap.fromImage(image).scaled(
                THUMB, THUMB, QtCore.Qt.KeepAspectRatio, QtCore.Qt.FastTransformation))
            thumb.setToolTip(f"row {stamp.row}, {width} x {height} px"
                             + (f" ({', '.join(stamp.flags)})" if stamp.flags else ""))
        shape = stamps[0].pixels.shape if stamps and stamps[0].pixels is not None else None
        self.preview_note.setText(f"{len(stamps)} of {self.state.n_rows} stamps"
                                  + (f", {shape[1]} x {shape[0]} px" if shape else ""))

    # -- task files -------------------------------------------------------------------
    def _load_task(self):
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Load task", "", "Task (*.toml)")
        if path:
            self._attempt(lambda: self.state.load_task_file(path), f"task loaded from {path}")

    def _save_task(self):
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save task", "", "Task (*.toml)")
        if path:
            self._attempt(lambda: self.state.save_task_file(path), f"task saved to {path}")

    # -- cost -------------------------------------------------------------------------
    def estimate_cost(self):
        """Estimate in a worker thread (making an engine may load a processor)."""
        from glue_qt.utils.threading import Worker

        state = self.state
        try:
            rows, task, spec = len(state.rows()), state.task(), state.engine_choice()
        except Exception as exc:  # noqa: BLE001
            state.estimate = one_line(exc)
            return None

        def estimate():
            from ..backends.base import create_backend

            with create_backend(spec[0], **spec[1]) as engine:
                return engine.estimate_cost(rows, task).describe()

        worker = Worker(estimate)
        worker.result.connect(self._on_estimate)  # slots of the panel: main thread
        worker.error.connect(self._on_estimate_error)
        worker.finished.connect(self._forget_estimators)
        state.estimate = "estimating…"
        self._estimators.append(worker)
        worker.start()
        return worker

    def _on_estimate(self, text: str):
        self.state.estimate = text

    def _on_estimate_error(self, info):
        self.state.estimate = one_line(info[1])

    def _forget_estimators(self):
        self._estimators = [w for w in self._estimators if w.isRunning()]

    # -- run --------------------------------------------------------------------------
    def plan(self) -> RunPlan:
        """The run the current choices describe (raises with a readable message)."""
        from ..backends.base import create_backend

        state = self.state
        task = state.task()
        rows = state.rows()
        spec, options = state.engine_choice()  # fixed now, built in the worker
        return RunPlan(data=state.catalog, rows=rows, source=state.stamp_source(),
                       task=task, make_engine=lambda: create_backend(spec, **options),
                       store_path=state.store_location(),
                       stamp_settings=state.stamp_settings())

    def classify(self) -> BackgroundRun | None:
        """Start classifying in the background; returns the run (None if it could not
        start, with the reason in the panel)."""
        if self.run is not None and self.run.is_running():
            self.show_status("a run is in progress: cancel it first", error=True)
            return None
        plan = self._attempt(self.plan)
        if plan is None:
            return None
        if self.run is not None:
            self.run.deleteLater()  # the previous run's record of answers
        run = BackgroundRun(plan, parent=self)
        run.progressed.connect(self._on_progress)
        run.started_engine.connect(self._on_started)
        run.finished.connect(self._on_finished)
        self.run = run
        self.progress.setRange(0, len(plan.rows))
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m")
        self.progress_label.setText("")
        self.classify_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.show_status(f"starting {plan.task.slug} on {len(plan.rows)} rows…")
        self.run_created.emit(run)
        run.start()
        return run

    def cancel(self):
        if self.run is not None and self.run.is_running():
            self.run.cancel()
            self.cancel_button.setEnabled(False)
            self.show_status("stopping after the current batch…")

    def _on_started(self, estimate: str):
        self.state.estimate = estimate
        self.show_status(f"classifying: {estimate}")

    def _on_progress(self, progress):
        self.progress.setMaximum(progress.total)
        self.progress.setValue(progress.done)
        self.progress_label.setText(f"done {progress.done} of {progress.total} · cached "
                                    f"{progress.cached} · failed {progress.failed} · "
                                    f"{_seconds(progress.eta)} left")

    def _on_finished(self, outcome: RunOutcome):
        self.last_outcome = outcome
        self.classify_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.state.last_rows = self.run.plan.rows
        self.state.refresh_counts()
        result = outcome.result
        if outcome.error:
            kept = f" ({outcome.written} rows kept)" if outcome.written else ""
            self.show_status(outcome.error + kept, outcome.details, error=True)
        elif outcome.cancelled:
            self.show_status(f"cancelled: {outcome.written} of {len(result.rows)} rows "
                             "done and kept; Classify again to finish (done rows come "
                             "from the store)")
        else:
            failed = len(result.errors)
            reasons: dict[str, int] = {}
            for reason in result.errors.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            common = sorted(reasons, key=reasons.get, reverse=True)
            self.show_status(f"done: {outcome.written - failed} rows classified"
                             + (f", {failed} failed ({common[0]})" if failed else ""),
                             "\n".join(f"{reasons[r]} x {r}" for r in common[:20]))

    def shutdown(self):
        """Stop a run before the application goes (a running thread must not outlive
        it)."""
        if self.run is not None and self.run.is_running():
            self.run.cancel()
            self.run.wait()

    # -- after a run --------------------------------------------------------------------
    def subsets_per_class(self):
        groups = self._attempt(self.state.subsets_per_class)
        if groups:
            self.show_status(f"{len(groups)} subsets: one per class")
        return groups

    def select_least_confident(self):
        group = self._attempt(self.state.select_least_confident)
        if group is not None:
            self.show_status(f"subset {group.label!r}: confidence below "
                             f"{self.state.threshold:.2f}")
        return group

    def show_confusion(self):
        report = self._attempt(self.state.confusion)
        if report is not None:
            self.confusion_text.setPlainText(report.format())
            self.confusion_text.setVisible(True)
            self.show_status(f"accuracy {report.accuracy:.3f} on {report.n} rows")
        return report

    def review_selected(self):
        cid = self._attempt(self.state.review_selected)
        if cid is not None:
            self.show_status(f"{cid.label} set to {self.state.review_label!r} for the "
                             "selected rows")
        return cid
