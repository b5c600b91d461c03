"""Graph members of shards: `graph.npz`, `graph.json` and `smi` (SMILES), decoded to checked tensors.

The decoded value is a `Graph` of checked tensors `x, edge_index[, edge_attr]`: float features as float32, integer
(categorical) features and `edge_index` as int64. The graph encoder's transform makes a PyG `Data` of it (and adds
positional encodings), so reading graph shards needs no torch_geometric. Nothing is unpickled: `.npz` array
headers are read first, so an object array (which would need pickle) or an oversized one is rejected before any
of its data is read.
Shape legend: N nodes, E edges, F node features, Fe edge features.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .decode import BadSample, Decoder, ManifestError, file_suffix, read_member, torch_module

if TYPE_CHECKING:
    import torch

MAX_GRAPH_ELEMENTS = 1 << 24  # per array (x, edge_index or edge_attr): 64 MiB of float32
MAX_GRAPH_JSON_BYTES = 64 << 20  # a graph.json member is parsed into Python lists, ~10x its size
MAX_SMILES_CHARS = 10_000
FIELDS = ("x", "edge_index", "edge_attr")
FEATURE_KINDS = "fiub"  # float, signed, unsigned, bool
# manifest files are written under the decoder's suffixes by their last extension, whatever their own names
FILE_SUFFIXES = {"npz": "graph.npz", "json": "graph.json", "smi": "smi"}


@dataclass
class Graph:
    """A decoded graph: x [N, F], edge_index [2, E] (int64, pointing into x), edge_attr [E, Fe] or None."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]


def _npz_arrays(raw: bytes) -> dict[str, np.ndarray]:
    """The graph fields of an `.npz`. Each member is read once: its header first (an object dtype, which would
    need pickle, or an oversized array is refused before any data is read), then its data into a fresh array."""
    out = {}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            for info in zf.infolist():
                name = info.filename.removesuffix(".npy")
                if name not in FIELDS:
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, fortran_order, dtype = read_header(f)
                    if dtype.hasobject:
                        raise BadSample("undecodable_graph", f"'{name}' is an object array (it would need pickle)")
                    count = math.prod(shape)
                    if count > MAX_GRAPH_ELEMENTS:
                        raise BadSample("graph_too_large", f"'{name}' has shape {shape}")
                    flat = np.empty(count, dtype=dtype)
                    if f.readinto(memoryview(flat).cast("B")) != flat.nbytes:
                        raise BadSample("undecodable_graph", f"'{name}' is truncated")
                out[name] = flat.reshape(shape, order="F" if fortran_order else "C")
    except (
        zipfile.BadZipFile,
        zlib.error,
        ValueError,
        OSError,
        EOFError,
        NotImplementedError,
        RuntimeError,
    ) as exc:  # RuntimeError: an encrypted member
        raise BadSample("undecodable_graph", f"not a readable .npz: {str(exc)[:200]}") from None
    return out


def _json_arrays(raw: bytes) -> dict[str, np.ndarray]:
    if len(raw) > MAX_GRAPH_JSON_BYTES:
        raise BadSample("graph_too_large", f"graph.json of {len(raw)} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadSample("undecodable_graph", f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise BadSample("undecodable_graph", "graph.json is not an object")
    out = {}
    for key in FIELDS:
        if key in doc and doc[key] is not None:
            try:
                out[key] = np.asarray(doc[key])
            except ValueError as exc:  # ragged nested lists
                raise BadSample("invalid_graph", f"'{key}' is not a rectangular array: {str(exc)[:120]}") from None
    return out


def _tensor(a: np.ndarray) -> torch.Tensor:
    """float -> float32, integers and bools -> int64; native byte order and C-contiguous for torch."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, rejected afterwards
        return torch_module().from_numpy(np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else np.int64))


def graph_from_arrays(arrays: dict[str, np.ndarray]) -> Graph:
    """Validate `x`, `edge_index`, optional `edge_attr` and return them as a Graph; BadSample on anything wrong."""
    for key in ("x", "edge_index"):
        if key not in arrays:
            raise BadSample("undecodable_graph", f"no '{key}' array")
    x, edge_index, edge_attr = arrays["x"], arrays["edge_index"], arrays.get("edge_attr")
    for key, a in (("x", x), ("edge_attr", edge_attr)):
        if a is not None and a.dtype.kind not in FEATURE_KINDS:
            raise BadSample("undecodable_graph", f"'{key}' has dtype {a.dtype}; expected float or integer")
    if edge_index.size == 0:  # `[]` or `[[], []]` in JSON parse as float
        edge_index = np.zeros((2, 0), dtype=np.int64)
    if edge_index.dtype.kind not in "iu":
        raise BadSample("undecodable_graph", f"'edge_index' has dtype {edge_index.dtype}; expected integer")
    if x.ndim >= 1 and x.shape[0] == 0:
        raise BadSample("empty_graph")
    if x.ndim != 2 or x.shape[1] == 0:
        raise BadSample("invalid_graph", f"'x' has shape {x.shape}; expected [N, F] with F >= 1")
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise BadSample("invalid_graph", f"'edge_index' has shape {edge_index.shape}; expected [2, E]")
    n, e = x.shape[0], edge_index.shape[1]
    if edge_attr is not None and edge_attr.size == 0 and e == 0:
        edge_attr = None  # no edges, so nothing to describe (and no width to read off `[]`)
    if edge_attr is not None and (edge_attr.ndim != 2 or edge_attr.shape[0] != e or edge_attr.shape[1] == 0):
        raise BadSample("invalid_graph", f"'edge_attr' has shape {edge_attr.shape}; expected [E={e}, Fe]")
    if e and (edge_index.min() < 0 or edge_index.max() >= n):
        raise BadSample(
            "invalid_graph", f"edge_index spans [{edge_index.min()}, {edge_index.max()}], outside the {n} nodes of x"
        )
    out = {"x": _tensor(x), "edge_index": _tensor(edge_index)}
    if edge_attr is not None:
        out["edge_attr"] = _tensor(edge_attr)
    for key in ("x", "edge_attr"):
        t = out.get(key)
        if t is not None and t.is_floating_point() and not t.isfinite().all():
            raise BadSample("invalid_graph", f"'{key}' has non-finite values (as float32)")
    return Graph(**out)


def graph_from_smiles(raw: bytes) -> Graph:
    """A `.smi` member (the SMILES, optionally followed by whitespace and a name) -> a molecular graph with
    PyG's OGB-style categorical features: x long [N, 9] over heavy atoms, edge_attr long [E, 3]. Needs RDKit, the
    optional `chem` extra (imported here, for SMILES members only, with PyG's converter)."""
    try:
        tokens = raw.decode("utf-8").split()
    except UnicodeDecodeError:
        raise BadSample("bad_smiles", "not UTF-8") from None
    if not tokens:
        raise BadSample("bad_smiles", "empty")
    smiles = tokens[0]
    if len(smiles) > MAX_SMILES_CHARS:
        raise BadSample("graph_too_large", f"SMILES of {len(smiles)} characters")
    try:
        from rdkit import Chem, RDLogger
    except ImportError:
        raise BadSample("no_rdkit", "install rdkit to read .smi members") from None
    from torch_geometric.utils import from_rdmol

    # `from_smiles` would turn an unparsable SMILES into an empty molecule; parse here to tell them apart.
    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise BadSample("bad_smiles", smiles[:100])
    if mol.GetNumAtoms() == 0:
        raise BadSample("empty_graph")
    try:
        mol_data = from_rdmol(mol)
    except ValueError as exc:  # an atom or bond property outside PyG's feature vocabulary (x_map / e_map)
        raise BadSample("bad_smiles", f"{smiles[:100]}: {str(exc)[:100]}") from None
    return Graph(mol_data.x, mol_data.edge_index, mol_data.edge_attr)


class GraphDecoder(Decoder):
    """`graph.npz` (numpy arrays), `graph.json` (the same fields as lists) or `smi` (SMILES, with RDKit)."""

    modality = "graph"
    suffixes = ("graph.npz", "graph.json", "smi")
    manifest_fields = ("smiles",)

    def from_value(self, value: Any) -> Graph:
        """A graph (PyG Data), or a SMILES string (with RDKit)."""
        return self.decode({"smi": value.encode("utf-8")}) if isinstance(value, str) else value

    def decode(self, sample: dict[str, Any]) -> Graph:
        suffix = next(s for s in self.suffixes if s in sample)
        raw = sample[suffix]
        if suffix == "smi":
            return graph_from_smiles(raw)
        return graph_from_arrays(_npz_arrays(raw) if suffix == "graph.npz" else _json_arrays(raw))

    def members(self, field: str, value: Any, base: Path) -> dict[str, Any]:
        """`graph`: a numpy archive (`*.npz`), a JSON file (`*.json`), a SMILES file (`*.smi`) or an inline object
        `{x, edge_index, edge_attr}`; `smiles`: a SMILES string."""
        if field == "smiles":
            if not isinstance(value, str) or not value.strip():
                raise ManifestError("'smiles' must be a non-empty string")
            return {"smi": value.strip().encode("utf-8")}
        if isinstance(value, dict):
            return {"graph.json": json.dumps(value).encode("utf-8")}
        path = Path(str(value))
        suffix = FILE_SUFFIXES.get(path.suffix.lstrip(".").lower(), file_suffix(path))
        if suffix not in self.suffixes:
            raise ManifestError(
                f"{field} file '{value}' has suffix '{suffix}'; {field} takes .npz, .json or .smi "
                "files, or an inline {x, edge_index} object"
            )
        return {suffix: read_member(field, value, base)}
