"""fileio's rule for folders a user fills: no symbolic link is followed, no `..`, no special file."""

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine

from persona_pipeline.fileio import (UnsafePath, entry_refusal, filesystem_now_ns, link_refusal, read_regular, scan_folder,
                                     sha256_file)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "real.jpg").write_bytes(b"real")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (root / "sub" / "link.jpg").symlink_to(outside / "secret")
    (root / "sub" / "inside-link.jpg").symlink_to(root / "sub" / "real.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "sub" / "pipe.jpg")
    os.link(root / "sub" / "real.jpg", root / "sub" / "hard.jpg")
    return root, outside


def test_link_refusal_names_the_first_link_and_dot_dot(tree):
    root, _ = tree
    assert link_refusal(root, root / "sub" / "real.jpg") is None
    assert link_refusal(root, "sub/real.jpg") is None
    assert link_refusal(root, "sub/link.jpg").startswith("sub/link.jpg is a symbolic link (to ")
    assert link_refusal(root, "sub/inside-link.jpg").startswith("sub/inside-link.jpg is a symbolic link")
    assert link_refusal(root, "linked/secret").startswith("linked is a symbolic link")
    assert "'..'" in link_refusal(root, "sub/../../outside/secret")
    assert "is outside" in link_refusal(root, "/etc/passwd")
    assert "a FIFO" in entry_refusal(root, "sub/pipe.jpg")


def test_scan_folder_lists_regular_files_and_refuses_the_rest(tree):
    root, _ = tree
    scan = scan_folder(root / "sub", root)
    # A hard link is the file itself (same inode): accepted, by decision (see link_refusal).
    assert [p.name for p in scan.files] == ["hard.jpg", "real.jpg"]
    assert [p.name for p, _ in scan.refused] == ["inside-link.jpg", "link.jpg", "pipe.jpg"]
    whole = scan_folder(root / "linked", root)
    assert whole.files == [] and [p.name for p, _ in whole.refused] == ["linked"]
    assert [p.name for p in scan_folder(root, root).folders] == ["sub"]


def test_read_regular_never_opens_a_link_or_a_fifo(tree):
    root, _ = tree
    assert read_regular(root / "sub" / "real.jpg") == b"real"
    with pytest.raises(UnsafePath, match="link.jpg is a symbolic link"):
        read_regular(root / "sub" / "link.jpg")
    with pytest.raises(UnsafePath, match="pipe.jpg is a FIFO"):  # opened non-blocking: no hang
        read_regular(root / "sub" / "pipe.jpg")
    with pytest.raises(UnsafePath):
        sha256_file(root / "sub" / "link.jpg", follow_links=False)


def test_filesystem_now_ns_reads_the_folders_clock_not_the_process_clock(tmp_path):
    """A file's age is measured on the clock that stamps it: with the process clock a year off, a
    file written just now is still seconds old, and the probe leaves nothing behind."""
    fresh = tmp_path / "fresh.safetensors"
    fresh.write_bytes(b"x")
    with time_machine.travel(timedelta(days=400), tick=True):
        assert abs(time.time() - fresh.stat().st_mtime) > 300 * 86400  # the process clock moved
        assert abs(filesystem_now_ns(tmp_path) / 1e9 - fresh.stat().st_mtime) < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.safetensors"]


def test_write_safetensors_gives_the_same_bytes_in_every_process(tmp_path):
    """safetensors' own writer orders the header by a per-process hash seed, so the same LoRA saved by
    two runs had two sha256s; ours sorts the header. Three processes, one file each: one hash."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from persona_pipeline.fileio import write_safetensors\n"
        "tensors = {f'lora_unet_block_{i}.lora_down.weight': torch.full((2, 3), float(i)) for i in range(12)}\n"
        "write_safetensors(Path(sys.argv[1]), tensors, {f'key{i}': str(i) for i in range(9)})\n"
    )
    paths = [tmp_path / f"run{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=REPO)
    assert len({sha256_file(path) for path in paths}) == 1

    from safetensors import safe_open

    with safe_open(str(paths[0]), "pt") as handle:
        assert handle.metadata() == {f"key{i}": str(i) for i in range(9)}
        assert sorted(handle.keys()) == sorted(f"lora_unet_block_{i}.lora_down.weight" for i in range(12))
        assert float(handle.get_tensor("lora_unet_block_7.lora_down.weight")[1, 2]) == 7.0
    header_length = int.from_bytes(paths[0].read_bytes()[:8], "little")
    assert header_length % 8 == 0
