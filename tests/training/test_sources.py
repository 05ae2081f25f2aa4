"""--data parsed once into a typed source: each spelling's kind, and each mistake's one line."""

from pathlib import Path

import pytest

from training.config import DistillConfig
from training.data.images import PairDataset
from training.data.sources import BuiltinPrompts, DiverseWorld, ImageFolder, PromptFile, TarShards, World, parse_source
from training.errors import DataError, UserError


def test_each_spelling_parses_to_its_kind(tmp_path):
    (tmp_path / "imgs").mkdir()
    assert parse_source(None) == BuiltinPrompts()
    assert parse_source(tmp_path / "imgs") == ImageFolder(tmp_path / "imgs")
    assert parse_source("world:12") == World(12)
    assert parse_source("prompts:my prompts.txt") == PromptFile(Path("my prompts.txt"))
    shards = parse_source(f"{tmp_path}/s-{{000..002}}.tar")
    assert isinstance(shards, TarShards) and [p.name for p in shards.paths] == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert str(shards) == f"{tmp_path}/s-{{000..002}}.tar"
    assert parse_source("not/there") == ImageFolder(Path("not/there"))  # refused by check(), not by parsing
    assert [parse_source(s).data_free for s in (None, "prompts:p.txt", "world:3", str(tmp_path))] == [
        True, True, False, False,
    ]


@pytest.mark.parametrize(
    "data, message",
    [
        ("world:", "give world:N with N >= 1"),
        ("world:-3", "give world:N with N >= 1"),
        ("diverse:x", "give diverse:N with N >= 1"),
        ("prompts:", "give prompts:FILE"),
    ],
)
def test_malformed_prefixes_are_refused_when_the_config_resolves(data, message):
    with pytest.raises(UserError, match=message):
        DistillConfig(teacher="t", data=data).resolved()


def test_config_keeps_the_users_string_and_parses_it_once(tmp_path):
    cfg = DistillConfig(teacher="t", data="world:7").resolved()
    assert cfg.data == "world:7" and cfg.source == World(7) and cfg.source is cfg.source


def test_check_names_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="neither an image folder nor .tar shards"):
        parse_source(tmp_path / "nothing").check()
    with pytest.raises(DataError, match="s-000.tar, .*s-001.tar"):
        parse_source(f"{tmp_path}/s-{{000..001}}.tar").check()
    with pytest.raises(UserError, match="does not exist"):
        parse_source(f"prompts:{tmp_path / 'none.txt'}").check()
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert parse_source(f"prompts:{tmp_path / 'p.txt'}").prompts() == ["one", "two"]


def test_a_dataset_takes_a_parsed_source_or_its_string(tmp_path, images):
    folder = images(tmp_path / "d", 3)
    by_string, by_source = PairDataset(str(folder), 8), PairDataset(ImageFolder(folder), 8)
    assert by_string.pairs == by_source.pairs and len(by_source) == 3
    with pytest.raises(DataError, match="is not images"):
        PairDataset(World(3), 8)


def test_diverse_is_a_world_with_its_own_folder_and_captions(tmp_path):
    from types import SimpleNamespace

    from training.data import scenes
    from training.data.prepare import world_folder

    diverse = parse_source("diverse:5")
    assert diverse == DiverseWorld(5) != World(5) and isinstance(diverse, World) and not diverse.data_free
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    folder = world_folder(diverse, tmp_path, accelerator).path
    assert folder == tmp_path / "diverse"
    assert [scenes.sample_caption(folder, i) for i in range(5)] == [
        scenes.caption_of(scenes.sample(i)[0], i, 0, "diverse") for i in range(5)]
    assert world_folder(World(5), tmp_path, accelerator).path == tmp_path / "world"
    assert scenes.sample_caption(tmp_path / "world", 2) == scenes.sample(2)[0].caption
