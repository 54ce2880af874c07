import json
import shutil

import pytest
import yaml

pytest.importorskip("sklearn")

from carp_fast.config import ConfigError  # noqa: E402
from carp_fast.eval import features as feat  # noqa: E402
from carp_fast.eval import suite  # noqa: E402
from test_copydetection import write_copydays  # noqa: E402
from test_retrieval import write_revisited  # noqa: E402
from test_knn import save_run_checkpoint  # noqa: E402


def folder_set(root, **protocols):
    return {"name": "tiny", "train": str(root / "train"), "val": str(root / "val"), "image_size": 32,
            "protocols": protocols or {"knn": {"k": [1]}}}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"datasets": [], }, "'datasets' must be a non-empty list"),
        ({"outptu": "x", "datasets": [{"name": "a", "train": "t", "val": "v", "protocols": {"knn": None}}]},
         "unknown config key 'outptu'; did you mean 'output'"),
        ({"datasets": [{"name": "a", "train": "t", "val": "v", "protocols": {"knnn": None}}]},
         r"unknown config key 'datasets\[0\].protocols.knnn'; did you mean"),
        ({"datasets": [{"name": "a", "train": "t", "val": "v", "protocols": {"copydetection": {}}}]},
         "copydetection does not apply to a imagefolder data set"),
        ({"datasets": [{"name": "a", "train": "t", "val": "v", "protocols": {"knn": {"k": "ten"}}}]},
         r"datasets\[0\].protocols.knn.k: expected a list"),
        ({"datasets": [{"name": "a", "train": "t", "val": "v", "protocols": {"fewshot": {"shots": [1, "x"]}}}]},
         r"fewshot.shots\[1\]: expected an integer"),
        ({"datasets": [{"name": "a", "kind": "revisited", "protocols": {"retrieval": {}}}]}, "needs path"),
        ({"datasets": [{"name": "a", "train": "t", "val": "v", "crop_queries": True, "protocols": {"knn": {}}}]},
         "crop_queries applies to revisited data sets only"),
        ({"datasets": [{"train": "t", "val": "v", "protocols": {"knn": {}}}]}, r"datasets\[0\].name is required"),
        ({"datasets": [{"name": "a", "train": "t", "val": "v", "protocols": {"knn": {}}}] * 2}, "used twice"),
        ({"datasets": [{"name": "a", "train": "t", "val": "v", "protocols": {"knn": {"tempreature": 1}}}]},
         "did you mean '.*knn.temperature'"),
    ],
)
def test_spec_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        suite.parse_spec(values)


def test_spec_defaults_and_example_file():
    spec = suite.parse_spec({"datasets": [
        {"name": "a", "train": "t", "val": "v", "protocols": {"knn": None, "fewshot": {"runs": 2}}},
        {"name": "r", "kind": "revisited", "path": "p", "protocols": {"retrieval": None}},
    ]})
    assert spec.datasets[0].image_size == 224 and spec.datasets[0].protocols["knn"].k == [10, 20, 100, 200]
    assert spec.datasets[0].protocols["fewshot"].shots == [1, 2, 4, 8, 16]
    assert spec.datasets[1].multiscale and spec.compare_random
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "docs" / "eval_suite_example.yaml"
    parsed = suite.load_spec(example)  # the documented example stays valid
    assert {d.kind for d in parsed.datasets} == {"imagefolder", "revisited", "copydays"}


@pytest.fixture
def world(tiny_dataset, tiny_config, tmp_path):
    """A run checkpoint and one tiny data set of each layout."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    save_run_checkpoint(tiny_config(), run_dir / "last.pt")
    revisited = write_revisited(tmp_path / "revisited", num_images=6, num_queries=2)
    copydays = write_copydays(tmp_path / "copydays")
    distractors = tmp_path / "yfcc"
    shutil.copytree(tiny_dataset / "val" / sorted(p.name for p in (tiny_dataset / "val").iterdir())[0], distractors)
    return {"run": run_dir, "folder": tiny_dataset, "revisited": revisited, "copydays": copydays,
            "distractors": distractors, "tmp": tmp_path}


def write_spec(world, datasets, **top):
    path = world["tmp"] / "spec.yaml"
    values = {"device": "cpu", "num_workers": 0, "batch_size": 8, "cache_dir": str(world["tmp"] / "cache"),
              "datasets": datasets, **top}
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_every_protocol_on_tiny_data_then_from_cache(world, monkeypatch, capsys):
    datasets = [
        folder_set(world["folder"], knn={"k": [1, 3]}, linear={"epochs": 2, "batch_size": 8},
                   kmeans={"seeds": [0, 1]}, fewshot={"shots": [1, 2], "runs": 2}, retrieval=None),
        {"name": "rtoy", "kind": "revisited", "path": str(world["revisited"]), "image_size": 40, "protocols": {"retrieval": None}},
        {"name": "rtoy-crop", "kind": "revisited", "path": str(world["revisited"]), "image_size": 40, "crop_queries": True,
         "multiscale": False, "protocols": {"retrieval": None}},
        {"name": "copydays", "kind": "copydays", "path": str(world["copydays"]), "distractors": str(world["distractors"]),
         "whitening": str(world["folder"] / "train" / "disc"), "image_size": 32, "protocols": {"copydetection": {"max_rank": 5}}},
    ]
    spec = write_spec(world, datasets)
    out = world["tmp"] / "out"
    bench = world["tmp"] / "bench.json"
    assert suite.main(["--ckpt", str(world["run"]), "--spec", str(spec), "--out", str(out), "--json", str(bench), "--quiet"]) == 0
    report = json.loads((out / "suite.json").read_text())
    assert json.loads(bench.read_text()) == report
    trained, random = report["results"]["CARP teacher"], report["results"]["random init"]
    assert set(trained) == {"tiny", "rtoy", "rtoy-crop", "copydays"}
    assert trained["rtoy-crop"]["retrieval"]["crop_queries"] and not trained["rtoy"]["retrieval"]["crop_queries"]
    assert set(trained["tiny"]) == {"knn", "linear", "kmeans", "fewshot", "retrieval"}
    assert set(trained["tiny"]["knn"]["results"]) == {"1", "3"}
    assert set(trained["tiny"]["fewshot"]["shots"]) == {"1", "2"}
    assert 0 <= trained["tiny"]["kmeans"]["nmi"] <= 100 and "map@r" in trained["tiny"]["retrieval"]
    assert set(trained["rtoy"]["retrieval"]) >= {"easy", "medium", "hard"}
    assert trained["copydays"]["copydetection"]["num_queries"] == 4
    num_distractors = len(list(world["distractors"].iterdir()))
    assert trained["copydays"]["copydetection"]["num_database"] == 3 + num_distractors == report["datasets"]["copydays"]["num_db"]
    # The checkpoint is the run's untrained model (seed 0): random init is the same network.
    assert trained["tiny"]["knn"] == {**random["tiny"]["knn"], "seconds": trained["tiny"]["knn"]["seconds"]}
    assert report["datasets"]["tiny"]["num_train"] == 24 and report["datasets"]["rtoy"]["view"]["scales"][2] == 0.5
    markdown = (out / "suite.md").read_text()
    for title in ("k-NN top-1", "k-means", "Low-shot", "Retrieval", "Copy detection", "Linear probe"):
        assert title in markdown
    assert "| random init |" in markdown and "tiny 1-NN" in markdown and "rtoy H mAP" in markdown
    # Four views (centre crop, multi-scale thumbnail, cropped single-scale thumbnail, square), each signed.
    views = sorted((world["tmp"] / "cache").iterdir())
    assert len(views) == 4 and all((v / "view.json").is_file() for v in views)
    assert len(list(world["tmp"].glob("cache/view-*/query_crops_rtoy-crop/*.png"))) == 2

    # A second run reads every feature from the cache.
    def no_extraction(*args, **kwargs):
        raise AssertionError("features extracted again")

    monkeypatch.setattr(feat, "extract_features", no_extraction)
    assert suite.main(["--ckpt", str(world["run"]), "--spec", str(spec), "--out", str(out), "--quiet", "--only", "knn,retrieval"]) == 0
    again = json.loads((out / "suite.json").read_text())
    assert again["results"]["random init"]["tiny"]["knn"]["results"] == random["tiny"]["knn"]["results"]
    assert set(again["results"]["random init"]) == {"tiny", "rtoy", "rtoy-crop"}


def forbid_extraction(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("extraction started before the spec was checked")

    monkeypatch.setattr(feat, "extract_features", fail)


def run_expecting_error(world, spec, capsys, message):
    code = suite.main(["--ckpt", str(world["run"]), "--spec", str(spec), "--out", str(world["tmp"] / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    return err


def test_unreadable_image_in_a_later_data_set_fails_before_any_extraction(world, monkeypatch, capsys):
    forbid_extraction(monkeypatch)
    broken = world["revisited"] / "jpg" / "img3.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    spec = write_spec(world, [
        folder_set(world["folder"]),
        {"name": "rtoy", "kind": "revisited", "path": str(world["revisited"]), "protocols": {"retrieval": None}},
    ])
    run_expecting_error(world, spec, capsys, str(broken))


def test_missing_files_and_layouts_are_named(world, monkeypatch, capsys):
    forbid_extraction(monkeypatch)
    (world["revisited"] / "jpg" / "query1.jpg").unlink()
    spec = write_spec(world, [{"name": "rtoy", "kind": "revisited", "path": str(world["revisited"]), "protocols": {"retrieval": None}}])
    run_expecting_error(world, spec, capsys, "query1.jpg")
    spec = write_spec(world, [{"name": "cd", "kind": "copydays", "path": str(world["tmp"] / "nope"), "protocols": {"copydetection": None}}])
    run_expecting_error(world, spec, capsys, str(world["tmp"] / "nope" / "original"))
    spec = write_spec(world, [folder_set(world["folder"], fewshot={"shots": [5]})])
    run_expecting_error(world, spec, capsys, "5-shot needs 5 train images per class")
    spec = write_spec(world, [{"name": "x", "train": str(world["tmp"] / "absent"), "val": str(world["folder"] / "val"), "protocols": {"knn": None}}])
    run_expecting_error(world, spec, capsys, str(world["tmp"] / "absent"))
    bad_yaml = world["tmp"] / "bad.yaml"
    bad_yaml.write_text("datasets: [unclosed")
    run_expecting_error(world, bad_yaml, capsys, "not valid YAML")


def test_a_foreign_cache_folder_of_a_later_data_set_fails_before_any_extraction(world, monkeypatch, capsys):
    forbid_extraction(monkeypatch)
    rtoy = {"name": "rtoy", "kind": "revisited", "path": str(world["revisited"]), "protocols": {"retrieval": None}}
    spec = write_spec(world, [folder_set(world["folder"]), rtoy])
    view = suite.view_of(suite.load_spec(spec).datasets[1])[0]
    folder = suite.view_cache_dir(world["tmp"] / "cache", view)
    (folder / "view.json").write_text("{}")
    run_expecting_error(world, spec, capsys, "holds features of something else")


def test_files_it_did_not_write_are_not_overwritten(world, monkeypatch, capsys):
    forbid_extraction(monkeypatch)
    out = world["tmp"] / "out"
    out.mkdir()
    (out / "suite.json").write_text('{"mine": true}\n')
    spec = write_spec(world, [folder_set(world["folder"])])
    run_expecting_error(world, spec, capsys, "was not written by carp_fast.eval.suite")
    assert (out / "suite.json").read_text() == '{"mine": true}\n'


def test_a_foreign_view_folder_is_refused(tmp_path):
    view = {"transform": "resize-centre-crop", "size": 32}
    folder = suite.view_cache_dir(tmp_path, view)
    assert suite.view_cache_dir(tmp_path, view) == folder  # its own signature: reused
    (folder / "view.json").write_text('{"something": "else"}')
    with pytest.raises(suite.SuiteError, match="holds features of something else"):
        suite.view_cache_dir(tmp_path, view)
    assert (folder / "view.json").read_text() == '{"something": "else"}'
