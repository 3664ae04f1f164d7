"""Files read on the driver and written out on a worker's node (evomerge.shipping)."""

from __future__ import annotations

import shutil

from evomerge.shipping import Files, mirrored


def test_files_mirror_the_drivers_paths_once_per_content(tmp_path):
    model = tmp_path / "driver" / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"\x00\x01")
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")  # hidden: left out
    data = tmp_path / "driver" / "data.jsonl"
    data.write_text('{"q": 1}\n')
    files = Files.read([model, data, data, tmp_path / "missing"])
    assert sorted(files.contents) == sorted(str(p) for p in [model / "config.json", model / "sub" / "w.bin", data])
    assert files.digest == Files.read([data, model]).digest  # the content and paths, not the order asked

    root = files.materialize(tmp_path / "node")
    shutil.rmtree(tmp_path / "driver")  # the node never sees the driver's directories
    assert mirrored(root, data).read_text() == '{"q": 1}\n'
    assert (mirrored(root, model) / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert files.materialize(tmp_path / "node") == root  # written once: a second worker finds it
    assert [p.name for p in (tmp_path / "node").iterdir()] == [files.digest]  # no work directory left
