"""The workflow registry: one object per workflow, the only place a checkpoint's workflow is branched on."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignkit.core.checkpoint import WORKFLOWS as SCHEMA_WORKFLOWS
from alignkit.core.checkpoint import AlignkitSpec
from alignkit.modules.workflows import WORKFLOWS, ClipRefineWorkflow, StructureWorkflow, workflow_of

PACKAGE = Path(__file__).resolve().parents[1] / "alignkit"


def test_the_registry_covers_exactly_the_schema_and_each_module_names_its_workflow():
    assert set(WORKFLOWS) == set(SCHEMA_WORKFLOWS)
    for name, wf in WORKFLOWS.items():
        assert wf.name == name
        assert wf.module_class.workflow == name


def test_workflow_of_picks_by_the_recorded_name_and_reads_a_foreign_checkpoint_as_open_clip():
    assert isinstance(workflow_of(AlignkitSpec("structure", {"format": "x"})), StructureWorkflow)
    assert isinstance(workflow_of(AlignkitSpec("clip_refine", {"kind": "open_clip"})), ClipRefineWorkflow)
    assert isinstance(workflow_of(None), ClipRefineWorkflow)


def test_clip_refine_resume_problems_name_each_differing_encoder_field():
    module = SimpleNamespace(
        encoder=SimpleNamespace(spec={"kind": "open_clip", "model": "B", "pretrained": "t"})
    )
    saved = {"kind": "open_clip", "model": "A", "pretrained": "t"}
    assert WORKFLOWS["clip_refine"].resume_problems(saved, module) == [
        "encoder model: checkpoint 'A' vs this run 'B'"
    ]
    assert WORKFLOWS["clip_refine"].resume_problems(dict(module.encoder.spec), module) == []
    assert WORKFLOWS["structure"].resume_problems(saved, module) == []


def test_clip_refine_export_of_a_checkpoint_without_a_student_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="does not record an open_clip student"):
        WORKFLOWS["clip_refine"].write_open_clip({"state_dict": {}}, {}, tmp_path / "x", "model.", None, None)


def test_no_workflow_string_is_branched_on_outside_the_registry():
    """`workflow == "structure"`-style comparisons against a literal live in modules/workflows.py only."""
    pattern = re.compile(r"""workflow\s*[!=]=\s*["']|["']\s*[!=]=\s*\S*workflow\b""")
    found = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "workflows.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found
