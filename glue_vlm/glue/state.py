"""The panel's state: an echo ``State`` that holds every choice and knows how to turn
them into the core's inputs. Qt-free: tests and scripts drive it without widgets.

Glue's combo helpers keep the dataset and column choices in step with the data
collection; a hub listener keeps the subset list and the row count current.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from echo import CallbackProperty, SelectionCallbackProperty, delay_callback
from glue.core.data_combo_helper import ComponentIDComboHelper, DataCollectionComboHelper
from glue.core.hub import HubListener
from glue.core.state_objects import State

from ..backends.base import BackendError, backend_class, create_backend
from ..columns import UNCLASSIFIED
from ..stamps import INTERVALS, STRETCHES, Stamp, StampSettings, iter_stamps
from ..store import default_store_path
from ..tasks import PRESETS, Label, Task, TaskError, load_task, save_task
from . import sources
from .columns import (UNREVIEWED, class_counts, component_id, provenance_of,
                      write_review)
from .sources import GlueInputError

__all__ = ["ClassifierState", "ROW_CHOICES", "SOURCE_KINDS", "ENGINE_KINDS", "CUSTOM"]

ROW_CHOICES = {"selection": "current selection", "subset": "a subset", "all": "all rows"}
SOURCE_KINDS = {"image": "image + positions", "cube": "stamp cube (row first)",
                "paths": "column of file paths"}
POSITION_CHOICES = {"linked": "linked to the catalog", "pixel": "pixel columns (x, y)",
                    "sky": "RA/Dec columns + WCS"}
ENGINE_KINDS = {"gpt-4o": "GPT-4o (OpenAI)", "openai-compatible": "OpenAI-compatible server",
                "local": "local model (transformers)", "plugin": "other engine (module:Class)"}
DEFAULT_MODELS = {"gpt-4o": "gpt-4o", "openai-compatible": "",
                  "local": "llava-hf/llava-v1.6-mistral-7b-hf", "plugin": ""}
CUSTOM = "custom"
PREVIEW_COUNT = 8


def _labelled(mapping):
    return lambda key: mapping.get(key, str(key))


class _FilteredDataCombo(DataCollectionComboHelper):
    """A dataset combo over the data collection, showing only datasets that ``keep``."""

    def __init__(self, state, prop, data_collection, keep):
        self._keep = keep
        super().__init__(state, prop, data_collection)

    def refresh(self, *args):
        self.choices = [data for data in self._datasets if self._keep(data)]
        self.refresh_component_ids()


class ClassifierState(State, HubListener):
    """Everything the panel shows, as callback properties.

    ``session`` gives the current selection (glue's edit subsets); without one the
    rows come from a subset or all rows.
    """

    catalog = SelectionCallbackProperty(docstring="The catalog: a table, one row per object")
    rows_from = SelectionCallbackProperty(choices=list(ROW_CHOICES),
                                          display_func=_labelled(ROW_CHOICES))
    subset = SelectionCallbackProperty(docstring="Subset of the catalog to classify")
    n_rows = CallbackProperty(0, docstring="Rows that would be classified")
    rows_note = CallbackProperty("", docstring="Why there are no rows, if so")

    source_kind = SelectionCallbackProperty(choices=list(SOURCE_KINDS),
                                            display_func=_labelled(SOURCE_KINDS))
    image = SelectionCallbackProperty(docstring="Image the stamps are cut from")
    image_att = SelectionCallbackProperty(docstring="Component of the image with pixels")
    positions = SelectionCallbackProperty(choices=list(POSITION_CHOICES),
                                          display_func=_labelled(POSITION_CHOICES))
    x_att = SelectionCallbackProperty()
    y_att = SelectionCallbackProperty()
    ra_att = SelectionCallbackProperty()
    dec_att = SelectionCallbackProperty()
    size = CallbackProperty("64", docstring="Cutout size: pixels or an angle (20 arcsec)")
    cube = SelectionCallbackProperty(docstring="Stamp cube whose first axis is the row")
    cube_att = SelectionCallbackProperty()
    path_att = SelectionCallbackProperty(docstring="Catalog column of image file paths")
    base_dir = CallbackProperty("", docstring="Directory relative paths start from")
    stretch = SelectionCallbackProperty(choices=list(STRETCHES))
    interval = SelectionCallbackProperty(choices=list(INTERVALS))

    task_preset = SelectionCallbackProperty(choices=list(PRESETS) + [CUSTOM])
    task_slug = CallbackProperty("")
    task_prompt = CallbackProperty("")
    task_labels = CallbackProperty("", docstring="One label a line: 'name: description'")

    engine_kind = SelectionCallbackProperty(choices=list(ENGINE_KINDS),
                                            display_func=_labelled(ENGINE_KINDS))
    model = CallbackProperty(DEFAULT_MODELS["gpt-4o"])
    base_url = CallbackProperty("")
    api_key = CallbackProperty("", docstring="Used for the run only; never saved")
    detail = SelectionCallbackProperty(choices=["low", "high", "auto"])
    device = CallbackProperty("auto")
    local_mode = SelectionCallbackProperty(choices=["score", "generate"])
    batch_size = CallbackProperty(8)
    engine_spec = CallbackProperty("", docstring="package.module:Class of another engine")
    store_path = CallbackProperty("", docstring="Result store file; empty: the default")
    estimate = CallbackProperty("")

    truth_att = SelectionCallbackProperty(docstring="Column with the true labels")
    threshold = CallbackProperty(0.6, docstring="'Least confident' means below this")
    review_label = SelectionCallbackProperty()
    counts = CallbackProperty("")

    def __init__(self, data_collection, session=None):
        super().__init__()
        self.data_collection = data_collection
        self.session = session
        self.last_rows: np.ndarray | None = None
        self._option_style = "letter"
        self._filling_task = False
        self._models = dict(DEFAULT_MODELS)
        is_table = lambda data: data.ndim == 1  # noqa: E731
        self._catalogs = _FilteredDataCombo(self, "catalog", data_collection, is_table)
        self._images = _FilteredDataCombo(self, "image", data_collection,
                                          lambda data: data.ndim == 2)
        self._cubes = _FilteredDataCombo(self, "cube", data_collection,
                                         lambda data: data.ndim in (3, 4))
        numeric = dict(data_collection=data_collection, categorical=False, datetime=False)
        self._columns = {name: ComponentIDComboHelper(self, name, **numeric)
                         for name in ("x_att", "y_att", "ra_att", "dec_att")}
        self._columns["path_att"] = ComponentIDComboHelper(
            self, "path_att", data_collection=data_collection, numeric=False, datetime=False)
        self._columns["truth_att"] = ComponentIDComboHelper(
            self, "truth_att", data_collection=data_collection, none="(none)")
        self._image_att = ComponentIDComboHelper(self, "image_att", **numeric)
        self._cube_att = ComponentIDComboHelper(self, "cube_att", **numeric)
        type(self).subset.set_display_func(self, lambda s: s.label)

        self.add_callback("catalog", self._catalog_changed)
        self.add_callback("image", lambda *_: self._bands_changed(self._image_att, self.image))
        self.add_callback("cube", lambda *_: self._bands_changed(self._cube_att, self.cube))
        self.add_callback("task_preset", self._fill_task)
        for name in ("task_slug", "task_prompt", "task_labels"):
            self.add_callback(name, self._task_edited)
        self.add_callback("engine_kind", self._engine_kind_changed, echo_old=True)
        for name in ("rows_from", "subset"):
            self.add_callback(name, self.refresh_rows)
        self.add_callback("task_slug", self.refresh_counts)

        self._catalog_changed()
        self._bands_changed(self._image_att, self.image)
        self._bands_changed(self._cube_att, self.cube)
        if self.image is None and self.cube is not None:
            self.source_kind = "cube"
        self._fill_task()
        if data_collection.hub is not None:
            self.register_to_hub(data_collection.hub)

    # -- hub: keep subsets and the row count current -----------------------------------
    def register_to_hub(self, hub):
        from glue.core.message import (EditSubsetMessage, NumericalDataChangedMessage,
                                       SubsetCreateMessage, SubsetDeleteMessage,
                                       SubsetUpdateMessage)

        for message in (SubsetCreateMessage, SubsetDeleteMessage, SubsetUpdateMessage):
            hub.subscribe(self, message, handler=self._subsets_changed)
        hub.subscribe(self, EditSubsetMessage, handler=self.refresh_rows)
        hub.subscribe(self, NumericalDataChangedMessage, handler=self._data_changed,
                      filter=lambda msg: msg.data is self.catalog)

    def _subsets_changed(self, message):
        if message.subset.data is self.catalog:
            self._refresh_subsets()
            self.refresh_rows()

    def _data_changed(self, message):
        self.refresh_counts()

    # -- datasets and columns ----------------------------------------------------------
    def _catalog_changed(self, *args):
        catalog = self.catalog
        for name, helper in self._columns.items():
            helper.set_multiple_data([catalog] if catalog is not None else [])
        if catalog is not None:
            self._guess_columns(catalog)
            directory = sources.catalog_directory(catalog)
            self.base_dir = str(directory) if directory else ""
        self._refresh_subsets()
        self.refresh_rows()
        self.refresh_counts()

    def _guess_columns(self, catalog) -> None:
        """Preselect position columns by their usual names."""
        guesses = {"x_att": ("x", "xcentroid", "x_image"), "y_att": ("y", "ycentroid", "y_image"),
                   "ra_att": ("ra", "ra_deg", "raj2000", "alpha_j2000"),
                   "dec_att": ("dec", "dec_deg", "dej2000", "decj2000", "delta_j2000")}
        for name, labels in guesses.items():
            for choice in getattr(type(self), name).get_choices(self):
                if choice is not None and choice.label.lower() in labels:
                    setattr(self, name, choice)
                    break

    def _bands_changed(self, helper, data):
        helper.none = "red, green, blue (colour)" if data is not None and \
            sources.band_components(data) else False
        helper.set_multiple_data([data] if data is not None else [])

    def _refresh_subsets(self):
        prop = type(self).subset
        current = self.subset
        subsets = list(self.catalog.subsets) if self.catalog is not None else []
        with delay_callback(self, "subset"):
            prop.set_choices(self, subsets)
            if any(current is s for s in subsets):
                self.subset = current
            else:
                self.subset = subsets[-1] if subsets else None

    # -- rows -------------------------------------------------------------------------
    def rows(self) -> np.ndarray:
        """Catalog rows to classify; raises ``GlueInputError`` with what to do."""
        catalog = self.catalog
        if catalog is None:
            raise GlueInputError("load a catalog (a table with one row per object) first")
        if self.rows_from == "all":
            return sources.rows_of(catalog)
        if self.rows_from == "subset":
            if self.subset is None:
                raise GlueInputError(f"{catalog.label!r} has no subsets: make a selection "
                                     "in a plot of the catalog first")
            return sources.rows_of(catalog, self.subset)
        if self.session is None:
            raise GlueInputError("no glue session: choose a subset or all rows")
        return sources.selection_rows(self.session.edit_subset_mode.edit_subset, catalog)

    def refresh_rows(self, *args):
        try:
            n, note = len(self.rows()), ""
        except GlueInputError as exc:
            n, note = 0, str(exc)
        self.n_rows, self.rows_note = n, note

    # -- stamps -----------------------------------------------------------------------
    def stamp_settings(self) -> StampSettings:
        return StampSettings(stretch=self.stretch, interval=self.interval)

    def stamp_source(self):
        """The chosen imaging as a stamp source aligned with the catalog's rows."""
        catalog = self.catalog
        if catalog is None:
            raise GlueInputError("load a catalog (a table with one row per object) first")
        if self.source_kind == "image":
            if self.image is None:
                raise GlueInputError("load an image (2-D data) to cut stamps from, or "
                                     "choose another stamp source")
            return sources.image_source(
                catalog, self.image, size=self.size, positions=self.positions,
                x=self.x_att, y=self.y_att, ra=self.ra_att, dec=self.dec_att,
                attribute=self.image_att)
        if self.source_kind == "cube":
            if self.cube is None:
                raise GlueInputError("load a stamp cube (N x H x W data, row first), or "
                                     "choose another stamp source")
            return sources.cube_source(self.cube, catalog.shape[0], attribute=self.cube_att)
        return sources.path_source(catalog, self.path_att, self.base_dir or None)

    def preview(self, count: int = PREVIEW_COUNT) -> list[Stamp]:
        """The first stamps of the chosen rows, prepared exactly as the engine will get
        them (same stretch, same shrinking)."""
        from ..run import stamp_settings_for

        rows = self.rows()[:count]
        engine = backend_class(self.engine_choice()[0])
        settings = stamp_settings_for(engine, self.stamp_settings())
        settings.encode_png = False
        return list(iter_stamps(self.stamp_source(), rows, settings))

    # -- task -------------------------------------------------------------------------
    def _fill_task(self, *args):
        if self.task_preset == CUSTOM:
            return
        task = PRESETS[self.task_preset]
        self._show_task(task)

    def _show_task(self, task: Task):
        self._filling_task = True
        try:
            self._option_style = task.option_style
            self.task_slug = task.slug
            self.task_prompt = task.prompt
            self.task_labels = "\n".join(
                f"{lab.name}: {lab.description}" if lab.description else lab.name
                for lab in task.labels)
        finally:
            self._filling_task = False

    def _task_edited(self, *args):
        if self._filling_task or self.task_preset == CUSTOM:
            return
        preset = PRESETS[self.task_preset]
        if (self.task_slug, self.task_prompt) != (preset.slug, preset.prompt) or \
                self._parse_labels() != preset.labels:
            self.task_preset = CUSTOM

    def _parse_labels(self) -> tuple[Label, ...]:
        labels = []
        for line in self.task_labels.splitlines():
            if line.strip():
                name, _, description = line.partition(":")
                labels.append(Label(name.strip(), description.strip()))
        return tuple(labels)

    def task(self) -> Task:
        """The chosen task: the preset itself, or one built from the edited fields
        (``TaskError`` says what is wrong with them)."""
        if self.task_preset != CUSTOM:
            return PRESETS[self.task_preset]
        return Task(slug=self.task_slug.strip(), prompt=self.task_prompt,
                    labels=self._parse_labels(), option_style=self._option_style,
                    title=self.task_slug.strip())

    def save_task_file(self, path) -> Path:
        save_task(self.task(), path)
        return Path(path)

    def load_task_file(self, path) -> Task:
        task = load_task(path)
        with delay_callback(self, "task_preset"):
            self.task_preset = CUSTOM
            self._show_task(task)
        return task

    # -- engine -----------------------------------------------------------------------
    def _engine_kind_changed(self, old, new):
        self._models[old] = self.model
        self.model = self._models.get(new, "")

    def engine_choice(self) -> tuple[str, dict]:
        """(backend name or import path, options) for ``create_backend``. The API key
        is passed only if typed here; otherwise the engine reads its environment."""
        kind, model = self.engine_kind, self.model.strip() or None
        key = self.api_key.strip() or None
        if kind == "gpt-4o":
            return "openai", {"model": model or "gpt-4o", "api_key": key,
                              "detail": self.detail}
        if kind == "openai-compatible":
            if not self.base_url.strip():
                raise BackendError("give the server's URL, e.g. http://localhost:8000/v1")
            if model is None:
                raise BackendError("give the model name the server serves")
            return "openai", {"model": model, "base_url": self.base_url.strip(),
                              "api_key": key, "detail": self.detail}
        if kind == "local":
            return "local", {"model": model, "device": self.device.strip() or "auto",
                             "mode": self.local_mode, "batch_size": int(self.batch_size)}
        spec = self.engine_spec.strip()
        if not re.match(r"^[\w.]+:\w+$", spec):
            raise BackendError("give the engine as package.module:Class")
        return spec, {"model": model, "batch_size": int(self.batch_size)}

    def create_engine(self):
        """A new engine for the chosen settings (may load a model: call it off the
        main thread). Local models stay loaded between engines."""
        spec, options = self.engine_choice()
        return create_backend(spec, **options)

    def store_location(self) -> Path:
        return Path(self.store_path).expanduser() if self.store_path.strip() \
            else default_store_path()

    # -- after a run ------------------------------------------------------------------
    def refresh_counts(self, *args):
        """One line of rows per class for the chosen task, if it has columns."""
        try:
            task = self.task()
        except TaskError:
            self.counts = ""
            return
        if self.catalog is None or component_id(self.catalog, f"{task.column_prefix}_code") \
                is None:
            self.counts = ""
        else:
            counts = class_counts(self.catalog, task)
            self.counts = ", ".join(f"{name} {n}" for name, n in counts.items())
        prop = type(self).review_label
        choices = task.label_names + [UNREVIEWED]
        if prop.get_choices(self) != choices:
            prop.set_choices(self, choices)

    def _classified(self, task: Task):
        catalog = self.catalog
        cid = None if catalog is None else component_id(catalog, f"{task.column_prefix}_code")
        if cid is None:
            raise GlueInputError(f"no {task.column_prefix}_* columns yet: classify first")
        return catalog, cid

    def _subset_group(self, label: str, subset_state):
        """Create the subset group ``label``, or update the one of that name. The
        user's current selection stays what it was (glue would make the new group the
        selection)."""
        mode = self.session.edit_subset_mode if self.session is not None else None
        selection = list(mode.edit_subset) if mode is not None else None
        for group in self.data_collection.subset_groups:
            if group.label == label:
                group.subset_state = subset_state
                break
        else:
            group = self.data_collection.new_subset_group(label=label,
                                                          subset_state=subset_state)
        if mode is not None and list(mode.edit_subset) != selection:
            mode.edit_subset = selection
        return group

    def subsets_per_class(self) -> list:
        """One subset per label of the task (updated in place on a rerun)."""
        task = self.task()
        catalog, code = self._classified(task)
        return [self._subset_group(f"{task.slug}: {name}", catalog.id[code] == i)
                for i, name in enumerate(task.label_names)]

    def select_least_confident(self):
        """A subset of classified rows whose confidence is below ``threshold``."""
        task = self.task()
        catalog, code = self._classified(task)
        confidence = component_id(catalog, f"{task.column_prefix}_confidence")
        state = (catalog.id[code] >= 0) & (catalog.id[confidence] < float(self.threshold))
        return self._subset_group(f"{task.slug}: least confident", state)

    def confusion(self):
        """Scores of the task's labels against ``truth_att`` over the rows of the last
        run (or every classified row)."""
        from ..evaluate import evaluate

        task = self.task()
        catalog, code = self._classified(task)
        if self.truth_att is None:
            raise GlueInputError("choose the column with the true labels")
        codes = np.asarray(catalog[code]).astype(int)
        rows = self.last_rows if self.last_rows is not None else np.flatnonzero(codes >= 0)
        truth = catalog.get_component(self.truth_att)
        values = truth.labels if getattr(truth, "categorical", False) else np.asarray(truth.data)
        predicted = [task.label_names[c] if c >= 0 else UNCLASSIFIED for c in codes[rows]]
        confidence = np.asarray(catalog[component_id(catalog,
                                                     f"{task.column_prefix}_confidence")])
        try:
            return evaluate(list(values[rows]), predicted, labels=task.label_names,
                            confidence=confidence[rows])
        except ValueError as exc:
            raise GlueInputError(f"cannot compare with {self.truth_att.label!r}: {exc}") from None

    def review_selected(self):
        """Give the currently selected rows the class ``review_label`` in
        ``<t>_human``; the model's columns stay as they are."""
        task = self.task()
        catalog = self.catalog
        if catalog is None or self.session is None:
            raise GlueInputError("select rows of a catalog first")
        rows = sources.selection_rows(self.session.edit_subset_mode.edit_subset, catalog)
        return write_review(catalog, task, rows, self.review_label)

    def provenance(self) -> dict | None:
        try:
            task = self.task()
        except TaskError:
            return None
        return None if self.catalog is None else provenance_of(self.catalog, task)
