"""Every input accounted for: the run-start line and <output>/skipped.txt name each skipped file with its reason, the
images that fail during training too; an I/O error stops the run naming the file; a run that can read no image stops
with one line instead of hanging (truncated images, cache entries removed during the run)."""

import errno
import logging
import shutil

import pytest

from training import loop
from training.data.images import PairDataset
from training.data.skips import UNREADABLE, Skip, Skipped
from training.distill import main
from training.errors import DataError
from training.loop import take_micro_batches

RUN = dict(mode="lcm", max_steps=3, batch_size=2)


def truncate(path):
    """Keep the first half of the file: the header still reads, the pixels do not."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("cache", [False, True])
def test_skipped_txt_names_every_input_left_out_with_its_reason(tiny_teacher, images, tmp_path, tiny_args, caplog,
                                                                cache):
    data, out = images(tmp_path / "data", 8), tmp_path / "out"
    (data / "img001.txt").unlink()
    (data / "img002.png").write_bytes(b"not an image")
    truncate(data / "img004.png")  # found when drawn (6 pairs, 3 batches, all drawn in the 3 steps), or cached
    with caplog.at_level(logging.INFO, logger="training"):
        assert main(tiny_args(tiny_teacher, data, out, cache_latents=cache, **RUN)) == 0
    listed = out / "skipped.txt"
    start = "5 image + caption pairs train; 3 inputs skipped (1 no caption, 2 unreadable)" if cache else (
        "6 image + caption pairs train; 2 inputs skipped (1 no caption, 1 unreadable)"
    )
    assert f"{start}, listed in {listed}; keep-best: off; fresh run" in caplog.text
    assert "3 steps in" in caplog.text and f"; 3 inputs skipped, listed in {listed};" in caplog.text
    assert listed.read_text().splitlines() == [
        "# every input this run does not train on: file<TAB>reason",
        f"{data / 'img001.png'}\tno caption: no img001.txt",
        f"{data / 'img002.png'}\tunreadable: not an image Pillow can read",
        f"{data / 'img004.png'}\tunreadable: image file is truncated",
    ]


def batch(captions, skipped=()):
    return {"captions": captions, "skipped": list(skipped)}


def test_empty_draws_stop_after_the_patience_and_not_before():
    bad = [Skip(f"img{i}.png", UNREADABLE, "image file is truncated") for i in range(5)]
    skipped = Skipped("out/skipped.txt")
    stream = iter([batch([], bad[:2])] * 99 + [batch(["a"], bad[2:3])])
    micro, met = take_micro_batches(stream, 1, skipped, patience=100)
    assert [m["captions"] for m in micro] == [["a"]] and len(met) == 99 * 2 + 1 and len(skipped) == 3
    with pytest.raises(DataError) as caught:
        take_micro_batches(iter([batch([], bad[3:])] * 100), 1, skipped, patience=100)
    assert str(caught.value) == (
        "no image could be read in 100 micro-batches in a row (5 inputs skipped; first unreadable: img0.png "
        "(unreadable: image file is truncated), img1.png (unreadable: image file is truncated), img2.png (unreadable: "
        "image file is truncated)); all are listed in out/skipped.txt: replace or remove them and rerun (--resume "
        "latest continues from the last checkpoint)"
    )


@pytest.mark.parametrize("cache", [False, True])
def test_a_run_whose_images_are_all_truncated_stops_with_one_line(tiny_teacher, images, tmp_path, tiny_args, capsys,
                                                                  cache):
    data, out = images(tmp_path / "data", 4), tmp_path / "out"
    for path in data.glob("*.png"):
        truncate(path)
    assert main(tiny_args(tiny_teacher, data, out, cache_latents=cache, **RUN)) == 2
    lines = error_lines(capsys)
    listed = (out / "skipped.txt").read_text().splitlines()[1:]
    first = ", ".join(f"{line.split(chr(9))[0]} ({line.split(chr(9))[1]})" for line in listed[:3])
    assert len(listed) == 4 and all(line.endswith("\tunreadable: image file is truncated") for line in listed)
    assert lines == [
        f"error: no image could be read in 100 micro-batches in a row (4 inputs skipped; first unreadable: {first}); "
        f"all are listed in {out / 'skipped.txt'}: replace or remove them and rerun (--resume latest continues from "
        "the last checkpoint)"
    ]


def test_cache_entries_removed_during_a_run_stop_it_with_one_line(tiny_teacher, tiny_data, tmp_path, tiny_args,
                                                                  monkeypatch, capsys):
    out, real_step = tmp_path / "out", loop.train_step

    def removes_the_latents_after_step_1(run, batches, step):
        losses = real_step(run, batches, step)
        shutil.rmtree(out / "cache" / "latents")
        return losses

    monkeypatch.setattr(loop, "train_step", removes_the_latents_after_step_1)
    assert main(tiny_args(tiny_teacher, tiny_data, out, **RUN)) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: no image could be read in 100 micro-batches in a row (8 inputs skipped; first "
                           f"unreadable: {tiny_data}/img")
    assert "(no cache entry: " in line and "/cache/latents/" in line and " is missing or damaged)" in line
    listed = (out / "skipped.txt").read_text().splitlines()[1:]
    assert sorted(entry.split("\t")[0] for entry in listed) == [str(tiny_data / f"img{i:03d}.png") for i in range(8)]


@pytest.mark.parametrize("cache", [False, True])
def test_an_io_error_reading_an_image_stops_the_run_naming_the_file(tiny_teacher, tiny_data, tmp_path, tiny_args,
                                                                    monkeypatch, capsys, cache):
    broken, real_bytes = tiny_data / "img003.png", PairDataset._bytes

    def eio(self, pair):
        if pair.file == str(broken):
            raise OSError(errno.EIO, "Input/output error", pair.file)
        return real_bytes(self, pair)

    monkeypatch.setattr(PairDataset, "_bytes", eio)  # the header scan opens the file itself: it reads
    assert main(tiny_args(tiny_teacher, tiny_data, tmp_path / "out", cache_latents=cache, **RUN)) == 2
    assert error_lines(capsys) == [
        f"error: cannot read {broken}: Input/output error; fix the file's permissions or the disk and rerun "
        "(--resume latest continues from the last checkpoint)"
    ]


def test_a_resumed_run_keeps_what_the_draws_before_its_checkpoint_met(tiny_teacher, images, tmp_path, tiny_args):
    data, out = images(tmp_path / "data", 4), tmp_path / "out"
    good = (data / "img001.png").read_bytes()
    truncate(data / "img001.png")  # drawn in the first epoch (4 pairs, 2 steps of 2), met only then
    run = dict(RUN, cache_latents=False, checkpoint_every=2)
    assert main(tiny_args(tiny_teacher, data, out, **dict(run, max_steps=2))) == 0
    (data / "img001.png").write_bytes(good)  # mended before the resume: the rest of the run can read it
    assert main(tiny_args(tiny_teacher, data, out, **dict(run, max_steps=4), resume="latest")) == 0
    assert (out / "skipped.txt").read_text().splitlines() == [
        "# every input this run does not train on: file<TAB>reason",
        f"{data / 'img001.png'}\tunreadable: image file is truncated",
    ]
