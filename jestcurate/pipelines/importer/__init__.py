"""`jestcurate import`: a score set from embeddings that already exist, without running a model.

Sources, each a list of units read in name order (one part per unit, resumable by its marker):
* datacomp: a DataComp pool folder, `NAME.parquet` (uid, url, text, ...) beside `NAME.npz`
  whose arrays `b32_img`, `b32_txt`, `l14_img`, `l14_txt` hold OpenAI CLIP embeddings row for
  row in the Parquet's order (`--embeddings l14|b32` picks the pair);
* clip-retrieval: its `inference` output, `img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy`
  and `metadata/metadata_N.parquet`, row for row.

Embeddings are L2-normalised and stored as float16; clip_score and ref_loss are computed from
the stored values exactly as `score` computes them, with the unit's own valid rows as the
negatives (so ref_loss depends on which rows share a unit, as it depends on the shard for
`score`). The logit scale, bias and loss kind come from the named model, or are given
(`--logit-scale`, `--logit-bias`, `--loss`) for embeddings whose weights are not at hand.

Without `--shards` rows are not tied to WebDataset shards: the set is for selection, dedup and
DataComp uids; commands that need the images say so (meta.json `images: false`). With
`--shards` the parts are the downloaded tars instead: a row per sample found in the tar (keys
and order from its headers, uids from img2dataset's sidecar SHARD.parquet, else from the
samples' json), its embeddings looked up by uid in a sorted index of the source's uids (about
8 bytes plus the uid's length per source row, in every task), ref_loss with the tar's rows as
negatives exactly as `score` would. A sample whose uid the source lacks is an error row;
source rows that no tar holds are counted as never downloaded.
"""

from jestcurate.pipelines.importer.byuid import SourceIndex, import_shard, shard_samples
from jestcurate.pipelines.importer.config import DATACOMP_EMBEDDINGS, FORMATS, ImportConfig
from jestcurate.pipelines.importer.job import (
    ImportReport,
    print_summary,
    run,
    targets,
    unfinished_tasks,
)
from jestcurate.pipelines.importer.sources import CAPTION_COLUMNS, Unit, import_unit, list_units

__all__ = [
    "CAPTION_COLUMNS",
    "DATACOMP_EMBEDDINGS",
    "FORMATS",
    "ImportConfig",
    "ImportReport",
    "SourceIndex",
    "Unit",
    "import_shard",
    "import_unit",
    "list_units",
    "print_summary",
    "run",
    "shard_samples",
    "targets",
    "unfinished_tasks",
]
