"""The LoRA library: safetensors header validation, key-format and family detection, the drop-folder
sensor and import job (on SQLite and PostgreSQL), versions, and the persona's weight/primary."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import func, select

from persona_pipeline import cli
from persona_pipeline.automation.lora_import import SETTLE_SECONDS, lora_import_job, lora_incoming_sensor
from persona_pipeline.db import models, registry
from persona_pipeline.db.session import session_scope
from persona_pipeline.definitions import build_resources
from persona_pipeline.personas import load_persona
from persona_pipeline.fileio import sha256_file
from persona_pipeline.training.lora_files import (
    LoraFileError,
    base_model_family,
    detect_family,
    detect_key_format,
    inspect_lora_file,
    read_safetensors_header,
)
from persona_pipeline_tests.conftest import make_settings, write_persona

SD15_KEY = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"


# --- LoRA files ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD, and a LoRA for it in each key format, made the way diffusers and kohya do."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from persona_pipeline.training.tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("tiny-loras")
    base = build_tiny_sd(root / "tiny-sd")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    peft_state = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(root, unet_lora_layers=convert_state_dict_to_diffusers(peft_state),
                                              weight_name="diffusers.safetensors", safe_serialization=True)
    # convert_state_dict_to_kohya maps a `unet.` prefix to `lora_unet_`; the peft dict has none.
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(root / "kohya.safetensors"))
    save_file(peft_state, str(root / "peft.safetensors"))
    return {"base": base, "diffusers": root / "diffusers.safetensors", "kohya": root / "kohya.safetensors",
            "peft": root / "peft.safetensors"}


def _foreign_lora(path: Path, dim: int, *, te2: bool = False, key: str = SD15_KEY) -> Path:
    """A small kohya-format LoRA whose cross-attention to_k takes `dim`-wide text embeddings."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"{key}.lora_down.weight": torch.zeros(4, dim, dtype=torch.float16),
               f"{key}.lora_up.weight": torch.zeros(320, 4, dtype=torch.float16),
               f"{key}.alpha": torch.tensor(4.0)}
    if te2:
        tensors["lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight"] = torch.zeros(4, 1280)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_header_of_a_real_file_is_read_without_loading(tiny_loras):
    header = read_safetensors_header(tiny_loras["kohya"])
    entry = header[f"{SD15_KEY}.lora_down.weight"]
    assert entry["dtype"] == "F32" and entry["shape"] == [4, 32]


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
    (lambda p: p.write_bytes(b"\xff" * 4096), "not plausible"),
    (lambda p: _raw_safetensors(p, b'{"a": 1}', length=5000), "runs past the end"),
    (lambda p: _raw_safetensors(p, b"\xfe\xfe not json at all"), "not UTF-8 JSON"),
    (lambda p: _raw_safetensors(p, b"[1, 2, 3]"), "not an object"),
    (lambda p: _raw_safetensors(p, {"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype 'F128'"),
    (lambda p: _raw_safetensors(p, {"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
    (lambda p: _raw_safetensors(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "run past"),
    (lambda p: _raw_safetensors(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "span 8 bytes"),
    (lambda p: _raw_safetensors(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps"),
    (lambda p: _raw_safetensors(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12), "trailing bytes"),
    (lambda p: _raw_safetensors(p, {"__metadata__": {"n": 1}}), "__metadata__"),
])
def test_broken_headers_are_refused_naming_the_file(tmp_path, make, problem):
    path = tmp_path / "broken.safetensors"
    make(path)
    with pytest.raises(LoraFileError, match=problem) as caught:
        read_safetensors_header(path)
    assert str(caught.value).startswith("broken.safetensors: ")


def test_a_truncated_real_file_is_refused(tmp_path, tiny_loras):
    data = tiny_loras["peft"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFileError, match=r"^cut\.safetensors: .*truncated"):
        read_safetensors_header(cut)


def test_key_formats_are_detected(tiny_loras):
    for kind in ("kohya", "diffusers", "peft"):
        assert detect_key_format(read_safetensors_header(tiny_loras[kind])) == kind
    # diffusers' newer peft-style names under the unet. prefix, and peft's own save_pretrained prefix
    assert detect_key_format(["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                              "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]) == "diffusers"
    assert detect_key_format(["base_model.model.mid_block.attn1.to_q.lora_A.weight"]) == "peft"
    with pytest.raises(LoraFileError, match=r"not a LoRA: no LoRA keys \(first keys: conv_in.bias, conv_in.weight"):
        detect_key_format(["conv_in.weight", "conv_in.bias", "time_embedding.linear_1.weight"])


def test_families_are_detected_from_the_cross_attention_width(tmp_path, tiny_loras):
    for kind in ("kohya", "diffusers", "peft"):
        assert detect_family(read_safetensors_header(tiny_loras[kind])) == "tiny-sd"
    assert detect_family(read_safetensors_header(_foreign_lora(tmp_path / "sd15.safetensors", 768))) == "sd15"
    assert detect_family(read_safetensors_header(_foreign_lora(tmp_path / "sdxl.safetensors", 2048))) == "sdxl"
    assert detect_family(read_safetensors_header(_foreign_lora(tmp_path / "odd.safetensors", 4096))) == "unknown-4096"
    ldm = _foreign_lora(tmp_path / "ldm.safetensors", 1024, key="lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k")
    assert detect_family(read_safetensors_header(ldm)) == "sd2"
    # no attn2 to_k matrix, but SDXL's second text encoder is there
    te2 = _foreign_lora(tmp_path / "te2.safetensors", 2048, te2=True, key="lora_unet_mid_block_attentions_0_proj_in")
    assert detect_family(read_safetensors_header(te2)) == "sdxl"


def test_base_model_family_reads_the_local_unet_config(tmp_path, tiny_loras):
    assert base_model_family(str(tiny_loras["base"])) == "tiny-sd"
    assert base_model_family("stable-diffusion-v1-5/stable-diffusion-v1-5") == "unknown"  # nothing downloaded
    (tmp_path / "xl" / "unet").mkdir(parents=True)
    (tmp_path / "xl" / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1280, "addition_embed_type": "text_time"}))
    assert base_model_family(str(tmp_path / "xl")) == "sdxl"


def test_inspect_refuses_a_family_mismatch_and_non_safetensors(tmp_path, tiny_loras):
    info = inspect_lora_file(tiny_loras["kohya"], "tiny-sd")
    assert (info.key_format, info.family, info.rank, info.cross_attention_dim) == ("kohya", "tiny-sd", 4, 32)
    sd15 = _foreign_lora(tmp_path / "other.safetensors", 768)
    with pytest.raises(LoraFileError, match=r"^other\.safetensors: LoRA is for sd15 \(cross-attention dim 768\) "
                                            r"but the base model tiny is tiny-sd$"):
        inspect_lora_file(sd15, "tiny-sd", base_model="tiny")
    assert inspect_lora_file(sd15, "unknown").family == "sd15"  # hub base model: not checked
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 pickle")
    with pytest.raises(LoraFileError, match=r"^model\.ckpt: not a \.safetensors file"):
        inspect_lora_file(ckpt, "tiny-sd")


# --- sensor and import job ----------------------------------------------------------------------

@pytest.fixture
def library(tmp_path, db_url, tiny_loras):
    """Settings and resources with persona `mira` in the database and the tiny SD already built."""
    settings = make_settings(tmp_path, db_url)
    folder = write_persona(settings.datasets_dir, "mira", photos=0)
    with session_scope(db_url) as session:
        registry.sync_persona(session, load_persona(folder))
    (settings.home / "models").mkdir(parents=True)
    (settings.home / "models" / "tiny-sd").symlink_to(tiny_loras["base"], target_is_directory=True)
    return settings, build_resources(settings)


def _drop(settings, source: Path, relpath: str, *, old: bool = True, data: bytes | None = None) -> Path:
    target = settings.home / "loras" / "incoming" / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes() if data is None else data)
    if old:  # settled: older than the sensor's wait, on the file system's clock
        past = target.stat().st_mtime - SETTLE_SECONDS - 5
        os.utime(target, (past, past))
    return target


def _tick(resources, cursor=None) -> dg.SensorResult:
    with dg.build_sensor_context(cursor=cursor, resources=resources) as context:
        return lora_incoming_sensor(context)


def _import(resources, relpath: str, path: Path):
    run_config = {"ops": {"import_lora": {"config": {"path": relpath, "sha256": sha256_file(path)}}}}
    return lora_import_job.execute_in_process(run_config=run_config, resources=resources, raise_on_error=False)


def _failure(result) -> str:
    event = next(e for e in result.all_events if e.is_step_failure)
    data = event.step_failure_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


def test_sensor_requests_one_run_per_settled_file_and_none_again(library, tiny_loras):
    settings, resources = library
    first = _drop(settings, tiny_loras["diffusers"], "mira/a.safetensors")
    _drop(settings, tiny_loras["kohya"], "mira/b.safetensors")
    _drop(settings, tiny_loras["kohya"], "mira/b.metadata.json", data=b"{}")  # metadata is not a run of its own
    _drop(settings, tiny_loras["peft"], "mira/c.safetensors.part")  # a download still in progress
    young = _drop(settings, tiny_loras["peft"], "mira/young.safetensors", old=False)

    result = _tick(resources)
    assert [r.run_key for r in result.run_requests] == [f"mira/a.safetensors:{sha256_file(first)}",
                                                        f"mira/b.safetensors:{sha256_file(tiny_loras['kohya'])}"]
    assert all(r.tags == {"persona": "mira"} and r.job_name == "lora_import" for r in result.run_requests)
    assert result.run_requests[0].run_config["ops"]["import_lora"]["config"]["path"] == "mira/a.safetensors"

    again = _tick(resources, result.cursor)
    assert again.run_requests == [] and json.loads(again.cursor) == json.loads(result.cursor)

    past = young.stat().st_mtime - SETTLE_SECONDS - 5
    os.utime(young, (past, past))  # it settled
    later = _tick(resources, again.cursor)
    assert [r.run_key.split(":")[0] for r in later.run_requests] == ["mira/young.safetensors"]


def test_import_registers_versions_copies_and_moves(library, tiny_loras, db_url):
    settings, resources = library
    incoming = settings.home / "loras" / "incoming"
    a = _drop(settings, tiny_loras["diffusers"], "mira/a.safetensors")
    result = _import(resources, "mira/a.safetensors", a)
    assert result.success
    output = result.output_for_node("import_lora")
    assert (output["status"], output["version"], output["family"], output["key_format"]) == ("imported", 1, "tiny-sd", "diffusers")
    assert not a.exists() and (incoming / "imported" / "mira" / "a.safetensors").is_file()

    b = _drop(settings, tiny_loras["kohya"], "mira/b.safetensors")
    _drop(settings, tiny_loras["kohya"], "mira/b.metadata.json",
          data=json.dumps({"name": "external v2", "primary": True, "weight": 0.8, "steps": 1200}).encode())
    assert _import(resources, "mira/b.safetensors", b).success
    assert (incoming / "imported" / "mira" / "b.metadata.json").is_file()

    with session_scope(db_url) as session:
        mira = registry.get_persona(session, "mira")
        rows = registry.list_loras(session, mira.id)
        assert [(m.lora.version, m.lora.origin, m.lora.family, m.lora.key_format, m.is_primary) for m in rows] == [
            (1, "imported", "tiny-sd", "diffusers", False), (2, "imported", "tiny-sd", "kohya", True)]
        second = rows[1].lora
        assert second.persona_id == mira.id and second.name == "external v2" and rows[1].weight == 0.8
        assert second.training["steps"] == 1200 and second.training["imported_from"] == "mira/b.safetensors"
        assert second.trigger_word == "t3st"
        library_file = Path(second.path)
        assert library_file == settings.home / "loras" / "library" / "mira" / f"{second.sha256[:16]}.safetensors"
        assert sha256_file(library_file) == second.sha256 == sha256_file(tiny_loras["kohya"])
        assert library_file.with_name(f"{second.sha256[:16]}.metadata.json").is_file()

    # The same bytes dropped again under another name: no new version, flags untouched, file kept.
    again = _drop(settings, tiny_loras["kohya"], "mira/b.safetensors")
    output = _import(resources, "mira/b.safetensors", again).output_for_node("import_lora")
    assert (output["status"], output["version"]) == ("already_in_library", 2)
    assert (incoming / "imported" / "mira" / "b-2.safetensors").is_file()
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(models.LoraModel)) == 2
        mira_id = registry.get_persona(session, "mira").id
        assert registry.primary_lora(session, mira_id).lora.version == 2
        # metadata.json's primary: true is a promotion like any other: an event with who and why.
        from persona_pipeline.db import promotion

        [event] = promotion.decisions(session, mira_id)
        assert (event.kind, event.reviewer, event.payload["reason"]) == (
            "promote_lora", "lora_import", "mira/b.safetensors: its metadata.json sets primary: true")

    # The same bytes for another persona: one library row, a mapping for that persona.
    with session_scope(db_url) as session:
        other_id = registry.sync_persona(session, load_persona(write_persona(settings.datasets_dir, "other", photos=0))).id
    shared = _drop(settings, tiny_loras["kohya"], "other/shared.safetensors")
    output = _import(resources, "other/shared.safetensors", shared).output_for_node("import_lora")
    assert (output["status"], output["version"]) == ("mapped", 2)
    with session_scope(db_url) as session:
        assert [m.lora.sha256 for m in registry.list_loras(session, other_id)] == [sha256_file(tiny_loras["kohya"])]
        assert session.scalar(select(func.count()).select_from(models.LoraModel)) == 2


def _library_count(db_url) -> int:
    with session_scope(db_url) as session:
        return session.scalar(select(func.count()).select_from(models.LoraModel))


def test_a_foreign_lora_is_refused_and_moved_with_its_reason(library, tmp_path, db_url):
    settings, resources = library
    incoming = settings.home / "loras" / "incoming"
    dropped = _drop(settings, _foreign_lora(tmp_path / "src" / "sd15.safetensors", 768), "mira/sd15.safetensors")
    result = _import(resources, "mira/sd15.safetensors", dropped)
    assert not result.success
    message = _failure(result)
    assert message == "sd15.safetensors: LoRA is for sd15 (cross-attention dim 768) but the base model world is tiny-sd"
    assert _library_count(db_url) == 0
    assert not dropped.exists()
    moved = incoming / "rejected" / "mira" / "sd15.safetensors"
    assert moved.read_bytes() == (tmp_path / "src" / "sd15.safetensors").read_bytes()  # nothing lost
    assert (incoming / "rejected" / "mira" / "sd15.safetensors.reason.txt").read_text().strip() == message
    assert not (settings.home / "loras" / "library").exists()


@pytest.mark.parametrize("relpath, data, problem", [
    ("mira/model.ckpt", b"PK\x03\x04 a pickle", "model.ckpt: not a .safetensors file"),
    ("mira/garbage.safetensors", b"\x00" * 3, "garbage.safetensors: not a safetensors file"),
    ("nobody/x.safetensors", None, "x.safetensors: unknown persona 'nobody'"),
    ("loose.safetensors", None, "loose.safetensors: not in a persona folder"),
])
def test_unreadable_or_misplaced_files_are_refused(library, tiny_loras, db_url, relpath, data, problem):
    settings, resources = library
    dropped = _drop(settings, tiny_loras["peft"], relpath, data=data)
    result = _import(resources, relpath, dropped)
    assert not result.success and _failure(result).startswith(problem)
    assert _library_count(db_url) == 0 and not dropped.exists()
    rejected = settings.home / "loras" / "incoming" / "rejected" / Path(relpath).parent / Path(relpath).name
    assert rejected.is_file() and rejected.with_name(rejected.name + ".reason.txt").is_file()


def test_bad_metadata_json_is_refused_naming_the_file(library, tiny_loras, db_url):
    settings, resources = library
    dropped = _drop(settings, tiny_loras["peft"], "mira/p.safetensors")
    _drop(settings, tiny_loras["peft"], "mira/metadata.json", data=b"{not json")
    result = _import(resources, "mira/p.safetensors", dropped)
    assert _failure(result).startswith("metadata.json: not valid JSON")
    assert _library_count(db_url) == 0
    rejected = settings.home / "loras" / "incoming" / "rejected" / "mira"
    assert sorted(p.name for p in rejected.iterdir()) == ["p.metadata.json", "p.safetensors", "p.safetensors.reason.txt"]


# --- versions, weight and primary ---------------------------------------------------------------

def _register(session, persona_id: int, sha: str, **kwargs) -> models.LoraModel:
    return registry.register_lora(session, persona_id, name=sha, path=Path(f"/x/{sha}.safetensors"), sha256=sha * 8,
                                  base_model="tiny", trigger_word="t3st", dataset_id=None, training={}, **kwargs)


def test_versions_weight_and_a_single_primary(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    with session_scope(db_url) as session:
        mira = registry.sync_persona(session, load_persona(write_persona(settings.datasets_dir, "mira", photos=0)))
        other = registry.sync_persona(session, load_persona(write_persona(settings.datasets_dir, "other", photos=0)))
        one = _register(session, mira.id, "aaaaaaaa")
        two = _register(session, mira.id, "bbbbbbbb", primary=False, origin="imported", family="sd15", key_format="kohya")
        elsewhere = _register(session, other.id, "cccccccc")
        assert (one.version, two.version, elsewhere.version) == (1, 2, 1)
        assert _register(session, mira.id, "aaaaaaaa").version == 1  # the same file keeps its version
        ids = (mira.id, one.id, two.id, other.id)

    with session_scope(db_url) as session:
        mira_id, one_id, two_id, other_id = ids
        assert registry.primary_lora(session, mira_id).lora_id == one_id
        registry.set_lora_mapping(session, mira_id, two_id, weight=0.6, primary=True)
    with session_scope(db_url) as session:
        rows = {m.lora_id: m for m in registry.list_loras(session, mira_id)}
        assert (rows[one_id].is_primary, rows[two_id].is_primary, rows[two_id].weight) == (False, True, 0.6)
        assert registry.primary_lora(session, other_id) is not None  # another persona's primary is untouched
        registry.set_lora_mapping(session, mira_id, two_id, primary=False)
        assert registry.primary_lora(session, mira_id) is None
        with pytest.raises(ValueError, match=r"weight = 2\.5 is out of range: allowed 0\.0 to 2\.0"):
            registry.set_lora_mapping(session, mira_id, one_id, weight=2.5)
        with pytest.raises(LookupError, match="not in persona"):
            registry.set_lora_mapping(session, other_id, one_id, weight=1.0)


def test_cli_lists_and_sets(tmp_path, db_url, monkeypatch, capsys):
    settings = make_settings(tmp_path, db_url)
    monkeypatch.setenv("PERSONA_HOME", str(settings.home))
    monkeypatch.setenv("PERSONA_DATABASE_URL", db_url)
    monkeypatch.setenv("PERSONA_DATASETS_DIR", str(settings.datasets_dir))
    with session_scope(db_url) as session:
        mira = registry.sync_persona(session, load_persona(write_persona(settings.datasets_dir, "mira", photos=0)))
        lora_id = _register(session, mira.id, "dddddddd").id
    assert cli.main(["lora", "set", "mira", str(lora_id), "--weight", "0.7", "--no-primary"]) == 0
    assert cli.main(["lora", "list", "mira"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.split()[:1] == [str(lora_id)]]
    assert "weight 0.70" in row and "primary" not in row  # no longer the primary: its role column is empty
    assert "demote_lora by" in out and "lora set --no-primary" in out  # and taking it away was recorded
    assert cli.main(["lora", "set", "mira", str(lora_id), "--weight", "3"]) == 2
    assert "out of range" in capsys.readouterr().err


# --- symbolic links in the drop folder -------------------------------------------------------------

def _link(settings, relpath: str, target: Path, *, folder: bool = False) -> Path:
    link = settings.home / "loras" / "incoming" / relpath
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=folder)
    past = link.lstat().st_mtime - SETTLE_SECONDS - 5
    os.utime(link, (past, past), follow_symlinks=False)
    return link


def test_a_linked_lora_is_refused_by_name_and_its_target_never_read(library, tiny_loras, tmp_path, db_url):
    """mira/linked.safetensors -> a real LoRA outside the drop folder was hashed by the sensor and
    copied into the library by the import. Now the sensor fingerprints the link's text, and the
    import refuses it by name, moves the link (not its target) to rejected/, and imports nothing."""
    settings, resources = library
    outside = tmp_path / "elsewhere" / "real.safetensors"
    outside.parent.mkdir()
    shutil.copy(tiny_loras["kohya"], outside)
    past = outside.stat().st_mtime - SETTLE_SECONDS - 5
    os.utime(outside, (past, past))  # settled too: only the link decides
    link = _link(settings, "mira/linked.safetensors", outside)
    _drop(settings, tiny_loras["kohya"], "mira/linked.metadata.json", data=b'{"name": "kept with its LoRA"}')

    (request,) = _tick(resources).run_requests
    path, sha = request.run_key.rsplit(":", 1)
    assert path == "mira/linked.safetensors" and sha != sha256_file(outside)  # the target was not hashed

    config = request.run_config["ops"]["import_lora"]["config"]
    result = lora_import_job.execute_in_process(run_config={"ops": {"import_lora": {"config": config}}},
                                                resources=resources, raise_on_error=False)
    assert not result.success
    assert _failure(result).startswith("mira/linked.safetensors is a symbolic link")
    assert _library_count(db_url) == 0 and not (settings.home / "loras" / "library").exists()
    rejected = settings.home / "loras" / "incoming" / "rejected" / "mira" / "linked.safetensors"
    assert rejected.is_symlink() and not link.is_symlink()  # the link itself was moved
    assert outside.read_bytes() == tiny_loras["kohya"].read_bytes()  # the target is where it was, untouched
    assert "symbolic link" in rejected.with_name("linked.safetensors.reason.txt").read_text()
    assert rejected.with_name("linked.metadata.json").read_bytes() == b'{"name": "kept with its LoRA"}'  # moved along


def test_a_linked_persona_folder_and_linked_metadata_are_refused(library, tiny_loras, tmp_path, db_url):
    settings, resources = library
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(tiny_loras["kohya"], elsewhere / "inside.safetensors")
    (elsewhere / "secret.json").write_text(json.dumps({"name": "SECRET-NAME"}))
    past = (elsewhere / "inside.safetensors").stat().st_mtime - SETTLE_SECONDS - 5
    os.utime(elsewhere / "inside.safetensors", (past, past))  # settled too: only the link decides
    _link(settings, "other", elsewhere, folder=True)

    # The linked folder is one entry: nothing in it is listed, and its import moves only the link.
    (request,) = _tick(resources).run_requests
    assert request.run_key.startswith("other:")
    config = request.run_config["ops"]["import_lora"]["config"]
    result = lora_import_job.execute_in_process(run_config={"ops": {"import_lora": {"config": config}}},
                                                resources=resources, raise_on_error=False)
    assert _failure(result).startswith("other is a symbolic link")
    assert (settings.home / "loras" / "incoming" / "rejected" / "other").is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["inside.safetensors", "secret.json"]

    # A LoRA whose metadata sidecar is a link: refused naming the sidecar; its JSON is not read.
    dropped = _drop(settings, tiny_loras["peft"], "mira/p.safetensors")
    _link(settings, "mira/p.metadata.json", elsewhere / "secret.json")
    result = _import(resources, "mira/p.safetensors", dropped)
    assert _failure(result).startswith("mira/p.metadata.json is a symbolic link")
    assert _library_count(db_url) == 0


def test_a_path_through_dot_dot_is_refused_and_nothing_moved(library, tiny_loras, db_url):
    """A launched config naming `../x.safetensors` (outside the drop folder) is refused; the file
    there is neither read nor moved into rejected/."""
    settings, resources = library
    outside = settings.home / "loras" / "x.safetensors"
    (settings.home / "loras" / "incoming").mkdir(parents=True)
    shutil.copy(tiny_loras["kohya"], outside)
    result = _import(resources, "../x.safetensors", outside)
    assert not result.success and "'..'" in _failure(result) and "nothing was read or moved" in _failure(result)
    assert outside.read_bytes() == tiny_loras["kohya"].read_bytes()
    assert not (settings.home / "loras" / "incoming" / "rejected").exists()
