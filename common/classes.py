"""The CellMap class table and the mapping of ``all``-map ids to training labels.

The table holds every canonical CellMap id with the set of atomic ids it
includes (groups are unions of their parts). A configured training class is a
*set of atomic ids*; the ``all`` map of a crop holds one canonical id per voxel
(the most granular one annotated), so each id maps to:

* the training class whose atom set contains all of the id's atoms,
* background when its atoms touch no configured class (e.g. ``mt`` for the
  14 default classes),
* unknown otherwise (a group spanning several classes, or a class and
  background: ``mito`` 50, ``golgi`` 40, ``er`` 51, ``cell`` 60, ...), because
  the annotator did not say which part the voxel is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# analyze's own per-class statistics block in datastats.yaml (pooled per-class voxel counts with
# unknown excluded, the pooled intensity clip): exact where MONAI's summary is not. Written by
# analyze, read by the training library's auto-configuration.
ANALYZE_STATS_KEY = "cellmap_stats"

# name -> (canonical id, atomic ids included; empty for atoms)
CELLMAP_CLASSES: dict[str, tuple[int, tuple[int, ...]]] = {
    "ecs": (1, ()),
    "pm": (2, ()),
    "mito_mem": (3, ()),
    "mito_lum": (4, ()),
    "mito_ribo": (5, ()),
    "golgi_mem": (6, ()),
    "golgi_lum": (7, ()),
    "ves_mem": (8, ()),
    "ves_lum": (9, ()),
    "endo_mem": (10, ()),
    "endo_lum": (11, ()),
    "lyso_mem": (12, ()),
    "lyso_lum": (13, ()),
    "ld_mem": (14, ()),
    "ld_lum": (15, ()),
    "er_mem": (16, ()),
    "er_lum": (17, ()),
    "eres_mem": (18, ()),
    "eres_lum": (19, ()),
    "ne_mem": (20, ()),
    "ne_lum": (21, ()),
    "np_out": (22, ()),
    "np_in": (23, ()),
    "hchrom": (24, ()),
    "nhchrom": (25, ()),
    "echrom": (26, ()),
    "nechrom": (27, ()),
    "nucpl": (28, ()),
    "nucleo": (29, ()),
    "mt_out": (30, ()),
    "cent": (31, ()),
    "cent_dapp": (32, ()),
    "cent_sdapp": (33, ()),
    "ribo": (34, ()),
    "cyto": (35, ()),
    "mt_in": (36, ()),
    "nuc": (37, tuple(range(20, 30))),
    "vim": (38, ()),
    "glyco": (39, ()),
    "golgi": (40, (6, 7)),
    "ves": (41, (8, 9)),
    "endo": (42, (10, 11)),
    "lyso": (43, (12, 13)),
    "ld": (44, (14, 15)),
    "rbc": (45, ()),
    "eres": (46, (18, 19)),
    "perox_mem": (47, ()),
    "perox_lum": (48, ()),
    "perox": (49, (47, 48)),
    "mito": (50, (3, 4, 5)),
    "er": (51, tuple(range(16, 24))),
    "ne": (52, (20, 21, 22, 23)),
    "np": (53, (22, 23)),
    "chrom": (54, (24, 25, 26, 27)),
    "mt": (55, (30, 36)),
    "isg_mem": (56, ()),
    "isg_lum": (57, ()),
    "isg_ins": (58, ()),
    "isg": (59, (56, 57, 58)),
    "cell": (60, (*range(2, 37), 38, 39, 47, 48, 56, 57, 58, 61, 62)),
    "actin": (61, ()),
    "tbar": (62, ()),
    "bm": (63, ()),
    "er_mem_all": (64, (16, 18, 20)),
    "ne_mem_all": (65, (20, 22, 23)),
    "cent_all": (66, (31, 32, 33)),
    "chloroplast_mem": (67, ()),
    "chloroplast_lum": (68, ()),
    "chloroplast_sg": (69, ()),
    "chloroplast": (70, (67, 68, 69)),
    "vacuole_mem": (71, ()),
    "vacuole_lum": (72, ()),
    "vacuole": (73, (71, 72)),
    "plasmodesmata": (74, ()),
}
# ``cell`` excludes 37 (nuc) in the source table but includes every nuc atom.

ID_TO_NAME: dict[int, str] = {cid: name for name, (cid, _) in CELLMAP_CLASSES.items()}

# Instance-segmentation classes: their arrays hold object ids (255 is an ordinary id).
INSTANCE_CLASSES: frozenset[str] = frozenset(
    {"nuc", "vim", "ves", "endo", "lyso", "ld", "perox", "mito", "np", "mt", "cell"}
)

DEFAULT_CLASSES: tuple[str, ...] = (
    "ecs",
    "pm",
    "mito_mem",
    "mito_lum",
    "mito_ribo",
    "golgi_mem",
    "golgi_lum",
    "ves_mem",
    "ves_lum",
    "endo_mem",
    "endo_lum",
    "er_mem",
    "er_lum",
    "nuc",
)

# Value that semantic arrays and the ``all`` map use for "unknown".
SOURCE_UNKNOWN = 255


def atoms(name: str) -> frozenset[int]:
    """Atomic ids of a class: its "ids included", or its own id for an atom."""
    cid, included = CELLMAP_CLASSES[name]
    return frozenset(included) if included else frozenset({cid})


def check_class_names(names: list[str] | tuple[str, ...]) -> None:
    """Raise ``ValueError`` for unknown, repeated or overlapping class names.

    Overlapping classes (``mito`` and ``mito_mem``) cannot share one integer map.
    """
    seen: dict[int, str] = {}
    for n in names:
        if n not in CELLMAP_CLASSES:
            raise ValueError(f"unknown CellMap class {n!r}")
        for a in atoms(n):
            if a in seen:
                raise ValueError(f"classes {seen[a]!r} and {n!r} overlap (both contain id {a})")
            seen[a] = n


@dataclass(frozen=True)
class LabelMapping:
    """How CellMap ids become training label values.

    Attributes:
        classes: configured class names; label value = position + 1.
        unknown_label: value written for unknown voxels (0 folds them into background).
    """

    classes: tuple[str, ...]
    unknown_label: int = 255

    def label_of(self, name: str) -> int:
        """Training label value of a configured class."""
        return self.classes.index(name) + 1

    def map_id(self, cellmap_id: int) -> int:
        """Training label of one ``all``-map id (see the module docstring)."""
        if cellmap_id == 0:
            return 0
        name = ID_TO_NAME.get(cellmap_id)
        if name is None:  # 255 (declared unknown) or an id this table lacks
            return self.unknown_label
        ids = atoms(name)
        hits = [c for c in self.classes if ids & atoms(c)]
        if not hits:
            return 0
        if len(hits) == 1 and ids <= atoms(hits[0]):
            return self.label_of(hits[0])
        return self.unknown_label

    def lookup_table(self) -> np.ndarray:
        """A 256-entry uint8 table mapping ``all``-map values to training labels."""
        return np.array([self.map_id(i) for i in range(256)], dtype=np.uint8)

    def class_for_array(self, array_name: str) -> str | None:
        """The configured class an array of that name fills, if exactly one."""
        return array_name if array_name in self.classes else None
