"""The image data stage on Ray Data: inputs -> decoded, converted, resized and center-cropped
uint8 pixels in parquet shards (train / val), with every unreadable image quarantined.

Inputs: ``digits`` (scikit-learn's bundled 1,797 8x8 handwritten digits: nothing downloaded),
image folders with one sub-folder per class (the ImageFolder convention), or .jsonl/.parquet
tables whose rows hold an image path (relative to the table's directory) or bytes, plus a label
or caption. The driver lists files and parses tables (small); Ray Data tasks read and decode the
images. A file that cannot be read or decoded, or a malformed table row, becomes a quarantine
row (source, reason) and is counted; a good image is never lost.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from aigc_ray.config import ImageDataConfig
from aigc_ray.data import DataError
from aigc_ray.storage import is_uri, list_files, read_bytes, write_bytes, writer_filesystem

log = logging.getLogger(__name__)

DIGITS = "digits"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ROWS = pa.schema(
    [
        ("source", pa.string()),
        ("path", pa.string()),  # read by the decode task when `data` is null
        ("data", pa.binary()),
        ("label", pa.string()),
        ("caption", pa.string()),
        ("error", pa.string()),  # already known bad (malformed table row)
    ]
)


def _row(source, path=None, data=None, label=None, caption=None, error=None) -> dict:
    return {
        "source": source,
        "path": path,
        "data": data,
        "label": label,
        "caption": caption,
        "error": error,
    }


def _digits_rows() -> list[dict]:
    from sklearn.datasets import load_digits

    from aigc_ray.images.model import png_bytes

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
    return [
        _row(f"digits/{i}", data=png_bytes(img[..., None]), label=str(int(y)))
        for i, (img, y) in enumerate(zip(pixels, digits.target, strict=True))
    ]


def _folder_rows(spec: str) -> list[dict]:
    """ImageFolder: <spec>/<class>/<file>; files with an image suffix only."""
    files = list_files(spec, keep=lambda p: PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES)
    return [_row(path, path=path, label=PurePosixPath(path).parent.name) for path, _ in files]


def _table_rows(spec: str, cfg: ImageDataConfig) -> list[dict]:
    """jsonl or parquet rows: image path (relative to the table) or bytes, label/caption."""
    from aigc_ray.data.readers import table_records

    base = spec.rsplit("/", 1)[0] if "/" in spec else "."
    fmt = "parquet" if spec.endswith(".parquet") else "json"
    records = []  # (row number, record, problem), read by the data stage's table reader
    for n, value, problem, _ in table_records(spec, read_bytes(spec), fmt):
        if problem is None and not isinstance(value, dict):
            problem = f"expected a JSON object, got {type(value).__name__}"
        records.append((n, value if problem is None else {}, problem))
    rows = []
    for n, rec, err in records:
        source = f"{spec}:{n}"
        image = rec.get(cfg.image_column)
        if err is None and image is None:
            err = f"no {cfg.image_column!r} column"
        label, caption = rec.get(cfg.label_column), rec.get(cfg.caption_column)
        label = None if label is None else str(label)
        if isinstance(image, bytes):
            rows.append(_row(source, data=image, label=label, caption=caption, error=err))
        else:
            path = None
            if isinstance(image, str):
                path = image if is_uri(image) or image.startswith("/") else f"{base}/{image}"
            elif err is None:
                err = f"{cfg.image_column!r} must be a path or bytes"
            rows.append(_row(source, path=path, label=label, caption=caption, error=err))
    return rows


def resolve_image_inputs(cfg: ImageDataConfig) -> list[dict]:
    """Every input row (not yet decoded). Raises DataError when an input is missing."""
    rows: list[dict] = []
    for spec in cfg.inputs:
        if spec == DIGITS:
            rows += _digits_rows()
        elif spec.endswith((".jsonl", ".json", ".parquet")):
            try:
                rows += _table_rows(spec, cfg)
            except OSError as e:
                raise DataError(f"image input {spec}: {e}") from None
        else:
            try:
                rows += _folder_rows(spec)
            except Exception as e:  # noqa: BLE001 - StorageError or a filesystem error
                raise DataError(f"image input {spec}: {e}") from None
    if not rows:
        raise DataError(f"no images in {cfg.inputs}")
    return rows


def to_pixels(data: bytes, size: int, channels: int) -> np.ndarray:
    """Decode, convert (L or RGB), resize the shorter side to `size`, center-crop: HxWxC uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def decode_batch(batch: pa.Table, size: int, channels: int) -> pa.Table:
    """Ray Data map_batches: rows -> pixels (raw HxWxC bytes) or an error naming the reason."""
    pixels, errors = [], []
    for row in batch.to_pylist():
        err, px = row["error"], None
        if err is None:
            try:
                data = row["data"] if row["data"] is not None else read_bytes(row["path"])
                px = to_pixels(data, size, channels).tobytes()
            except Exception as e:  # noqa: BLE001 - any unreadable image is quarantined
                why = "not an image PIL can decode" if "cannot identify" in str(e) else str(e)
                err = f"unreadable image: {type(e).__name__}: {why}"[:300]
        if err is None and row["label"] is None and row["caption"] is None:
            err, px = "no label or caption", None
        pixels.append(px)
        errors.append(err)
    keep = [c for c in ("source", "label", "caption") if c in batch.column_names]
    out = batch.select(keep)
    return out.append_column("pixels", pa.array(pixels, pa.binary())).append_column(
        "error", pa.array(errors, pa.string())
    )


def shard_rows(batch: pa.Table, split: str, labels: list[str], seed: int, cut: int) -> pa.Table:
    """Ray Data map_batches: the batch's readable images of one split, with their label ids."""
    sources = batch.column("source").to_pylist()
    keep = pa.array(
        [
            err is None and _split_of(src, seed, cut) == split
            for src, err in zip(sources, batch.column("error").to_pylist(), strict=True)
        ]
    )
    rows = batch.filter(keep).drop_columns(["error"])
    index = {name: i for i, name in enumerate(labels)}
    ids = [index.get(x, -1) for x in rows.column("label").to_pylist()]
    return rows.append_column("label_id", pa.array(ids, pa.int32()))


def _bucket(source: str, seed: int) -> int:
    """A stable number in [0, 1e6) per source: the split follows the file, not its position."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{source}".encode(), digest_size=8).digest())
    return h % 1_000_000


def _split_of(source: str, seed: int, cut: int) -> str:
    return "val" if _bucket(source, seed) < cut else "train"


def _val_cut(sources: list[str], seed: int, val_fraction: float) -> int:
    """The bucket below which a source is validation: val_fraction of them, and never none.

    On a small folder the hash alone can put no image in val (10 images at 0.2: one run in
    nine); then the source with the lowest bucket goes to val, so validation always runs."""
    cut = round(val_fraction * 1_000_000)
    if val_fraction > 0 and len(sources) >= 2:
        lowest = min(_bucket(s, seed) for s in sources)
        cut = max(cut, lowest + 1)
    return cut


def run_image_preprocess(cfg: ImageDataConfig) -> dict:
    """Run the image data stage; write train/val shards, quarantine and manifest.json."""
    import ray.data

    t0 = time.time()
    rows = resolve_image_inputs(cfg)
    table = pa.Table.from_pylist(rows, schema=ROWS)
    blocks = max(1, min(16, len(rows) // 256))
    decoded = (
        ray.data.from_arrow(table)
        .repartition(blocks)
        .map_batches(
            decode_batch,
            batch_format="pyarrow",
            batch_size=256,
            fn_kwargs={"size": cfg.image_size, "channels": cfg.channels},
        )
        .materialize()
    )
    # Only sources, labels and errors come to the driver; the pixels stay in the object store.
    meta = pa.concat_tables(
        ray.get(decoded.select_columns(["source", "label", "error"]).to_arrow_refs())
    )
    good = meta.filter(pa.compute.is_null(meta.column("error")))
    bad = meta.filter(pa.compute.is_valid(meta.column("error")))
    labels = sorted({x for x in good.column("label").to_pylist() if x is not None}, key=_label_key)
    if good.num_rows == 0:
        raise DataError(f"no readable image in {cfg.inputs} ({bad.num_rows} quarantined)")
    out = cfg.output_dir.rstrip("/")
    _clear(out)
    sources = good.column("source").to_pylist()
    cut = _val_cut(sources, cfg.seed, cfg.val_fraction)
    split = [_split_of(s, cfg.seed, cut) for s in sources]
    splits = {}
    for name in ("train", "val"):
        splits[name] = {"images": split.count(name)}
        if splits[name]["images"]:
            decoded.map_batches(
                shard_rows,
                batch_format="pyarrow",
                num_cpus=0.25,
                fn_kwargs={"split": name, "labels": labels, "seed": cfg.seed, "cut": cut},
            ).write_parquet(f"{out}/{name}", filesystem=writer_filesystem(out))
    quarantine = cfg.quarantine_dir or f"{out}/quarantine"
    if bad.num_rows:
        ray.data.from_arrow(bad.select(["source", "error"])).write_parquet(
            quarantine, filesystem=writer_filesystem(quarantine)
        )
        for src, why in zip(bad.column("source")[:5], bad.column("error")[:5], strict=True):
            log.warning("quarantined %s: %s", src, why)
    manifest = {
        "task": "image",
        "inputs": cfg.inputs,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "labels": labels,
        "read": table.num_rows,
        "quarantined": bad.num_rows,
        "quarantine_dir": quarantine if bad.num_rows else None,
        "splits": splits,
        "seconds": round(time.time() - t0, 1),
    }
    write_bytes(json.dumps(manifest, indent=1).encode(), f"{out}/manifest.json")
    return manifest


def _label_key(label: str):
    """Numeric class names in numeric order ('2' before '10'), others alphabetically."""
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _clear(out: str) -> None:
    if is_uri(out):
        return  # object storage: the shard names are new per run (Ray Data's uuids)
    import shutil

    for sub in ("train", "val", "quarantine", "manifest.json"):
        p = Path(out) / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def read_image_manifest(data_dir: str) -> dict:
    try:
        manifest = json.loads(read_bytes(f"{data_dir.rstrip('/')}/manifest.json"))
    except (OSError, ValueError) as e:
        raise DataError(
            f"no image manifest.json in {data_dir} ({type(e).__name__}): run the image data "
            "stage first (`aigc-ray preprocess --config configs/digits.yaml`)"
        ) from None
    if manifest.get("task") != "image":
        raise DataError(f"{data_dir}/manifest.json is a text corpus's, not images'")
    return manifest


def load_split(data_dir: str, split: str, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """(images N x C x H x W float32 in [-1, 1], label ids N) of a split, read with pyarrow."""
    import pyarrow.dataset as pads

    from aigc_ray.storage import filesystem_for

    n = manifest["splits"][split]["images"]
    s, c = manifest["image_size"], manifest["channels"]
    if not n:
        return np.zeros((0, c, s, s), np.float32), np.zeros(0, np.int64)
    filesystem, path = filesystem_for(f"{data_dir.rstrip('/')}/{split}")
    table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table(
        columns=["source", "pixels", "label_id"]
    )
    table = table.sort_by("source")  # the same order on every worker and every run
    raw = np.frombuffer(b"".join(table.column("pixels").to_pylist()), np.uint8)
    images = raw.reshape(-1, s, s, c).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    return images, np.asarray(table.column("label_id").to_pylist(), np.int64)


def format_image_report(m: dict) -> str:
    tr, va = m["splits"]["train"]["images"], m["splits"]["val"]["images"]
    return "\n".join(
        [
            f"  images     {m['read']} read, {tr} train / {va} val, "
            f"{m['image_size']}x{m['image_size']}x{m['channels']}",
            f"  classes    {len(m['labels'])}: {', '.join(m['labels'][:12])}",
            f"  quarantine {m['quarantined']} unreadable ({m['quarantine_dir'] or '-'})",
        ]
    )
