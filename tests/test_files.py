"""The bottom layer: the one JSON writer, atomic files and folders, and the configs' one dict reader."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from ei2.control import InjectionConfig, P2PConfig
from ei2.control.words import P2PError
from ei2.dataclass_io import from_dict, to_dict
from ei2.files import replace_folder, write_json
from ei2.models import Recipe


def test_write_json_is_indented_ends_with_a_newline_and_writes_paths_as_text(tmp_path):
    path = write_json(tmp_path / "deep" / "run.json", {"out": Path("/runs/a"), "steps": [1, 2]})
    text = path.read_text()
    assert text == json.dumps({"out": "/runs/a", "steps": [1, 2]}, indent=2) + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]  # no temporary file left


def test_write_json_keeps_the_old_file_when_the_data_cannot_be_written(tmp_path):
    path = write_json(tmp_path / "run.json", {"a": 1})
    circular = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        write_json(path, {"a": circular})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_replace_folder_swaps_a_whole_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.txt").write_text("new")
    replace_folder(tmp_path / "new", tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@dataclass(frozen=True)
class Options:
    size: int = 1
    window: tuple[float, float] = (0.0, 1.0)


def test_from_dict_names_an_unknown_key_its_nearest_field_and_all_of_them():
    assert from_dict(Options, {"window": [0.2, 0.5]}, "options") == Options(window=(0.2, 0.5))  # lists: tuples
    with pytest.raises(ValueError, match=r"^unknown options key 'sise' \(did you mean 'size'\?\); "
                                         r"known keys: size, window$"):
        from_dict(Options, {"sise": 2}, "options")
    with pytest.raises(KeyError, match=r"unknown options keys 'a', 'b'; known keys: size, window"):
        from_dict(Options, {"a": 1, "b": 2}, "options", KeyError)
    with pytest.raises(ValueError, match="options settings must be a mapping of size, window; got str"):
        from_dict(Options, "size", "options")
    assert to_dict(Options(window=(0.2, 0.5))) == {"size": 1, "window": [0.2, 0.5]}


@pytest.mark.parametrize("config", [
    P2PConfig("refine", cross_replace={"default": 0.8, "man": (0.1, 0.5)}, blend_words=("man",)),
    InjectionConfig(features=(0.1, 0.6), attention=0.5, block=2),
    Recipe("mine", "sparse-causal", "ta", "after-ff", trainable=("*.attn1.to_q.*",)),
])
def test_the_frozen_configs_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config


@pytest.mark.parametrize("cls, key, error, what", [
    (P2PConfig, "cross_replce", P2PError, "p2p"), (InjectionConfig, "feature", P2PError, "injection"),
    (Recipe, "temporl", ValueError, "recipe"),
])
def test_the_frozen_configs_give_the_one_unknown_key_error(cls, key, error, what):
    with pytest.raises(error, match=rf"unknown {what} key {key!r} \(did you mean '\w+'\?\); known keys: "):
        cls.from_dict({key: 1})
