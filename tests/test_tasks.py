import pytest

from glue_vlm.tasks import PRESETS, Label, Task, TaskError, get_task, load_task, save_task


def test_presets_cover_the_study_and_everyday_tasks():
    assert {"lsbg-vs-artifact", "galaxy-morphology", "paper-lsbg", "paper-morphology",
            "star-galaxy-artifact", "tidal-features"} <= set(PRESETS)
    morph = PRESETS["galaxy-morphology"]
    # GalaxyMNIST class order: the code of a label is its GalaxyMNIST class number
    assert morph.label_names == ["smooth_round", "smooth_cigar", "edge_on_disk",
                                 "unbarred_spiral"]
    assert PRESETS["paper-morphology"].label_names == morph.label_names
    # the study's LSBG task: Category 0 = non-LSBG, Category 1 = LSBG
    assert PRESETS["paper-lsbg"].label_names == ["artifact", "lsbg"]


def test_paper_presets_quote_the_published_prompt_verbatim_and_cite_it():
    lsbg = PRESETS["paper-lsbg"]
    assert lsbg.render_prompt() == lsbg.prompt.strip()
    assert lsbg.prompt.startswith("You are tasked to classify astronomical images.")
    assert "To what category does the image belong?" in lsbg.prompt
    assert "arXiv:2406.17057" in lsbg.reference
    assert lsbg.option_keys == ["0", "1"]
    assert PRESETS["paper-morphology"].option_keys == ["0", "1", "2", "3"]


def test_letter_tasks_list_every_option_with_its_description():
    task = PRESETS["star-galaxy-artifact"]
    prompt = task.render_prompt()
    assert task.option_keys == ["A", "B", "C"]
    for key, label in zip(task.option_keys, task.labels):
        assert f"{key}. {label.name}: {label.description}" in prompt
    assert prompt.rstrip().endswith("Answer with the letter of one option only.")


def test_fingerprint_changes_with_prompt_labels_and_order():
    base = Task("t", "Which?", (Label("a"), Label("b")))
    assert base.fingerprint() == Task("t", "Which?", (Label("a"), Label("b"))).fingerprint()
    others = [Task("t", "Which one?", (Label("a"), Label("b"))),
              Task("t", "Which?", (Label("b"), Label("a"))),
              Task("t", "Which?", (Label("a"), Label("c"))),
              Task("t", "Which?", (Label("a", "first"), Label("b"))),
              Task("t", "Which?", (Label("a"), Label("b")), option_style="number")]
    assert len({t.fingerprint() for t in others} | {base.fingerprint()}) == 6


@pytest.mark.parametrize("task_name", sorted(PRESETS))
def test_toml_round_trip(tmp_path, task_name):
    task = PRESETS[task_name]
    path = tmp_path / "task.toml"
    save_task(task, path)
    loaded = load_task(path)
    assert loaded == task
    assert loaded.fingerprint() == task.fingerprint()


def test_custom_task_from_toml_with_plain_label_list(tmp_path):
    path = tmp_path / "bars.toml"
    path.write_text('slug = "bars"\nprompt = "Is there a bar?"\nlabels = ["no bar", "bar"]\n')
    task = get_task(str(path))
    assert task.label_names == ["no bar", "bar"]
    assert task.column_prefix == "bars"


@pytest.mark.parametrize("kwargs, message", [
    (dict(slug="Bad Name"), "not usable as a column prefix"),
    (dict(slug="1abc"), "not usable as a column prefix"),
    (dict(prompt="   "), "empty prompt"),
    (dict(labels=(Label("only"),)), "at least two labels"),
    (dict(labels=(Label("a"), Label("a"))), "twice"),
    (dict(labels=(Label("edge on"), Label("edge-on"))), "same column name"),
    (dict(labels=(Label("a"), Label(" "))), "empty label"),
    (dict(labels=(Label("a"), Label("?!"))), "no letters or digits"),
    (dict(option_style="roman"), "option_style"),
])
def test_validation_messages(kwargs, message):
    fields = dict(slug="ok", prompt="Which?", labels=(Label("a"), Label("b")))
    fields.update(kwargs)
    with pytest.raises(TaskError, match=message):
        Task(**fields)


@pytest.mark.parametrize("text, message", [
    ('slug = "x"\nprompt = "p"\nlabels = [\n', "not valid TOML"),
    ('prompt = "p"\nlabels = ["a", "b"]\n', "missing field 'slug'"),
    ('slug = "x"\nprompt = "p"\nlabels = "a, b"\n', "'labels' must be a list"),
    ('slug = "x"\nprompt = "p"\nlabels = [1, 2]\n', "label 1 needs a text 'name'"),
    ('slug = "x"\nprompt = "p"\nlabels = ["a", "b"]\ncolour = "red"\n', "unknown field"),
    ('slug = "x"\nprompt = 3\nlabels = ["a", "b"]\n', "'prompt' must be text"),
])
def test_malformed_toml_gives_one_clear_message(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TaskError, match=message) as info:
        load_task(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_task_names_the_presets():
    with pytest.raises(TaskError, match="unknown task 'lsbg'.*lsbg-vs-artifact"):
        get_task("lsbg")
