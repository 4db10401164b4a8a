"""`sab3r-convert`: real and synthetic data into rosbag2 files with ground-truth topics.

    sab3r-convert scannet SCENE_DIR OUT_BAG [--stride 10] [--max-frames 300]
    sab3r-convert synthetic --seed 0 OUT_BAG [--frames 40 --width 256 --height 192]

The topic layout is :mod:`ros2_sab3r.eval.bag`'s. ScanNet is read in the layout of its export
tools (the SensReader export plus the 2D label images)::

    SCENE_DIR/color/<i>.jpg            colour images (any size; resized to the depth size)
    SCENE_DIR/depth/<i>.png            uint16 depth in millimetres
    SCENE_DIR/pose/<i>.txt             4x4 camera-to-world; frames with non-finite poses skipped
    SCENE_DIR/intrinsic/intrinsic_depth.txt (or intrinsic_color.txt, rescaled), 4x4 or 3x3
    SCENE_DIR/label-filt/<i>.png       uint16 ScanNet label ids (or label/)
    SCENE_DIR/instance-filt/<i>.png    instance ids (or instance/), optional
    scannetv2-labels.combined.tsv      raw id -> NYU40 id (columns 'id', 'nyu40id'), found in
                                       SCENE_DIR or its parent, or given with --label-map

Class ids in the bag are NYU40 ids; the label map is NYU40. Images are written at the depth
resolution (colour resized bilinearly, labels by nearest pixel) so every ground-truth image is
registered pixel for pixel to the camera image, as ScanNet's calibration intends.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
import sys

import numpy as np
from tqdm import tqdm

from ros2_sab3r.eval.bag import STORAGES, BagError, GroundTruthBagWriter
from ros2_sab3r.sim.standin import SceneSpec
from ros2_sab3r.sim.synthetic import NYU40

NYU40_LABELS = {i + 1: name for i, name in enumerate(NYU40)}


# ---------------------------------------------------------------------------------- synthetic
def convert_synthetic(out: Path, seed: int = 0, frames: int = 40, width: int = 256,
                      height: int = 192, fps: float = 5.0, storage: str = 'sqlite3',
                      progress: bool = True) -> int:
    """Render a synthetic scene into a bag; returns the number of frames written.

    The scene is recorded in the label map (``synthetic_scene``, a ``model.standin_scene``
    value), so ``sab3r-eval --standin`` can rebuild the stand-in backend for it (it answers
    frames by their stamps).
    """
    spec = SceneSpec(seed=seed, frames=frames, width=width, height=height, fps=fps)
    text = 'synthetic:' + spec.text()
    SceneSpec.parse(text)  # same validation as the node's stand-in
    _, rendered = spec.render()
    with GroundTruthBagWriter(out, storage=storage) as w:
        w.write_label_map(NYU40_LABELS, rendered[0].stamp_ns, source='synthetic',
                          synthetic_scene=text)
        for f in tqdm(rendered, desc='writing', unit='frame', disable=not progress):
            w.write_frame(f.stamp_ns, f.rgb, f.K, f.depth, f.semantic, f.instance, f.T_WC)
    return len(rendered)


# ------------------------------------------------------------------------------------ ScanNet
def write_scannet_layout(scene: Path, seed: int = 0, frames: int = 40, width: int = 256,
                         height: int = 192) -> int:
    """Render a synthetic scene into the ScanNet export layout (color/, depth/ in mm, pose/,
    intrinsic/intrinsic_depth.txt, label-filt/ holding NYU40 ids, instance-filt/), so the
    ScanNet path (``sab3r-convert scannet SCENE OUT --labels nyu40``) can be tested end to end
    without ScanNet data. Returns the number of frames written."""
    from PIL import Image

    scene = Path(scene)
    if scene.exists():
        raise BagError(f'{scene} already exists; give a new folder')
    for d in ('color', 'depth', 'pose', 'intrinsic', 'label-filt', 'instance-filt'):
        (scene / d).mkdir(parents=True)
    _, rendered = SceneSpec(seed=seed, frames=frames, width=width, height=height).render()
    for i, f in enumerate(rendered):
        Image.fromarray(f.rgb).save(scene / 'color' / f'{i}.png')
        depth_mm = np.where(np.isfinite(f.depth), np.rint(f.depth * 1000.0), 0)
        Image.fromarray(np.clip(depth_mm, 0, 65535).astype(np.uint16)).save(
            scene / 'depth' / f'{i}.png')
        Image.fromarray(f.semantic.astype(np.uint16)).save(scene / 'label-filt' / f'{i}.png')
        Image.fromarray(f.instance.astype(np.uint16)).save(scene / 'instance-filt' / f'{i}.png')
        np.savetxt(scene / 'pose' / f'{i}.txt', f.T_WC)
    K4 = np.eye(4)
    K4[:3, :3] = rendered[0].K
    np.savetxt(scene / 'intrinsic' / 'intrinsic_depth.txt', K4)
    return len(rendered)


def _first_dir(scene: Path, *names: str) -> Path | None:
    return next((scene / n for n in names if (scene / n).is_dir()), None)


def _read_matrix(path: Path) -> np.ndarray:
    try:
        M = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise BagError(f'{path} is not a text matrix: {err}') from err
    if M.shape not in ((4, 4), (3, 3)):
        raise BagError(f'{path} holds a {M.shape} matrix; expected 4x4 (or 3x3 intrinsics)')
    return M


def read_nyu40_mapping(path: Path) -> dict[int, int]:
    """ScanNet raw label id -> NYU40 id from scannetv2-labels.combined.tsv."""
    try:
        with open(path, encoding='utf-8', newline='') as f:
            rows = list(csv.DictReader(f, delimiter='\t'))
    except OSError as err:
        raise BagError(f'cannot read the label mapping {path}: {err}') from err
    if not rows or 'id' not in rows[0] or 'nyu40id' not in rows[0]:
        raise BagError(f"{path} has no 'id' and 'nyu40id' columns; give ScanNet's "
                       'scannetv2-labels.combined.tsv')
    out = {}
    for row in rows:
        try:
            out[int(row['id'])] = int(row['nyu40id'] or 0)
        except ValueError:
            continue
    return out


def _load_png(path: Path, size: tuple[int, int] | None = None, nearest: bool = True
              ) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if size is not None and im.size != size:
                im = im.resize(size, Image.NEAREST if nearest else Image.BILINEAR)
            return np.asarray(im)
    except (OSError, UnidentifiedImageError) as err:
        raise BagError(f'{path} cannot be read as an image: {err}') from err


def convert_scannet(scene: Path, out: Path, stride: int = 10, max_frames: int = 0,
                    label_map: Path | None = None, labels: str = 'raw', fps: float = 30.0,
                    storage: str = 'sqlite3', progress: bool = True) -> tuple[int, list[str]]:
    """Convert a ScanNet scene export; returns (frames written, notes on skipped data)."""
    scene = Path(scene)
    notes: list[str] = []
    color_dir, depth_dir = _first_dir(scene, 'color'), _first_dir(scene, 'depth')
    pose_dir = _first_dir(scene, 'pose')
    missing = [n for n, d in (('color', color_dir), ('depth', depth_dir), ('pose', pose_dir))
               if d is None]
    if missing:
        raise BagError(f'{scene} lacks {", ".join(missing)}/; expected the ScanNet export '
                       'layout (color/, depth/, pose/, intrinsic/; see sab3r-convert --help)')
    label_dir = _first_dir(scene, 'label-filt', 'label')
    inst_dir = _first_dir(scene, 'instance-filt', 'instance')
    mapping = None
    if label_dir is not None and labels == 'raw':
        tsv = label_map or next((p for p in (scene / 'scannetv2-labels.combined.tsv',
                                             scene.parent / 'scannetv2-labels.combined.tsv')
                                 if p.is_file()), None)
        if tsv is None:
            raise BagError(f'{label_dir} holds raw ScanNet label ids but no '
                           'scannetv2-labels.combined.tsv was found in the scene or its parent; '
                           'give it with --label-map, or --labels nyu40 if the images are NYU40')
        mapping = read_nyu40_mapping(Path(tsv))
    if label_dir is None:
        notes.append('no label-filt/ or label/ folder: the bag has no semantic ground truth')
    stems = sorted((p.stem for p in color_dir.glob('*.jpg')),
                   key=lambda s: (0, int(s)) if s.isdigit() else (1, s))
    if not stems:
        stems = sorted((p.stem for p in color_dir.glob('*.png')),
                       key=lambda s: (0, int(s)) if s.isdigit() else (1, s))
    if not stems:
        raise BagError(f'{color_dir} has no .jpg or .png images')
    stems = stems[::max(1, stride)]
    if max_frames > 0:
        stems = stems[:max_frames]
    K = _intrinsics(scene, depth_dir, stems[0])
    written = 0
    with GroundTruthBagWriter(out, storage=storage) as w:
        w.write_label_map(NYU40_LABELS, int(1e9), source=f'scannet:{scene.name}',
                          frame_stride=stride)
        for k, stem in enumerate(tqdm(stems, desc='writing', unit='frame',
                                      disable=not progress)):
            T_WC = _read_matrix(pose_dir / f'{stem}.txt')
            if T_WC.shape != (4, 4) or not np.all(np.isfinite(T_WC)):
                notes.append(f'frame {stem}: pose is not finite (tracking lost); skipped')
                continue
            depth_mm = _load_png(depth_dir / f'{stem}.png')
            H, W = depth_mm.shape[:2]
            color_path = next(color_dir / f'{stem}{e}' for e in ('.jpg', '.png')
                               if (color_dir / f'{stem}{e}').is_file())
            rgb = _load_png(color_path, (W, H), nearest=False)
            if rgb.ndim != 3:
                raise BagError(f'{color_path} is not an RGB image')
            semantic = instance = None
            if label_dir is not None:
                raw = _load_png(label_dir / f'{stem}.png', (W, H)).astype(np.int64)
                if mapping is not None:
                    lut = np.zeros(max(int(raw.max()), max(mapping)) + 1, np.int64)
                    for rid, nid in mapping.items():
                        lut[rid] = nid
                    raw = lut[raw]
                semantic = np.where((raw >= 0) & (raw <= 40), raw, 0).astype(np.int32)
            if inst_dir is not None and (inst_dir / f'{stem}.png').is_file():
                instance = _load_png(inst_dir / f'{stem}.png', (W, H)).astype(np.int32)
            stamp = int(1e9 + (k * max(1, stride)) * 1e9 / fps)
            depth = depth_mm.astype(np.float32) / 1000.0
            w.write_frame(stamp, rgb[..., :3].astype(np.uint8), K, depth, semantic, instance,
                          T_WC)
            written += 1
    if written == 0:
        raise BagError(f'no frame of {scene} had a valid pose; nothing was written')
    return written, notes


def _intrinsics(scene: Path, depth_dir: Path, stem: str) -> np.ndarray:
    idir = scene / 'intrinsic'
    depth_hw = _load_png(depth_dir / f'{stem}.png').shape[:2]
    if (idir / 'intrinsic_depth.txt').is_file():
        return _read_matrix(idir / 'intrinsic_depth.txt')[:3, :3].copy()
    if (idir / 'intrinsic_color.txt').is_file():
        color_dir = scene / 'color'
        first = next(iter(sorted(color_dir.iterdir())))
        cw, ch = _image_size(first)
        K = _read_matrix(idir / 'intrinsic_color.txt')[:3, :3].copy()
        K[0] *= depth_hw[1] / cw
        K[1] *= depth_hw[0] / ch
        return K
    raise BagError(f'{idir} has neither intrinsic_depth.txt nor intrinsic_color.txt')


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


# -------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='sab3r-convert', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='source', required=True)
    sc = sub.add_parser('scannet', help='a ScanNet scene export -> rosbag2')
    sc.add_argument('scene_dir', type=Path)
    sc.add_argument('out_bag', type=Path)
    sc.add_argument('--stride', type=int, default=10, help='keep every n-th frame')
    sc.add_argument('--max-frames', type=int, default=0, help='0: all kept frames')
    sc.add_argument('--label-map', type=Path, default=None,
                    help='scannetv2-labels.combined.tsv (raw id -> NYU40)')
    sc.add_argument('--labels', choices=('raw', 'nyu40'), default='raw',
                    help='what the label images hold')
    sc.add_argument('--fps', type=float, default=30.0, help='capture rate, for the stamps')
    sy = sub.add_parser('synthetic', help='a procedural synthetic scene -> rosbag2')
    sy.add_argument('out_bag', type=Path)
    sy.add_argument('--seed', type=int, default=0)
    sy.add_argument('--frames', type=int, default=40)
    sy.add_argument('--width', type=int, default=256)
    sy.add_argument('--height', type=int, default=192)
    sy.add_argument('--fps', type=float, default=5.0)
    sy.add_argument('--layout', choices=('bag', 'scannet'), default='bag',
                    help="'scannet': write a ScanNet export folder instead of a bag (labels are "
                    'NYU40 ids: convert it with --labels nyu40)')
    for p in (sc, sy):
        p.add_argument('--storage', choices=STORAGES, default='sqlite3')
        p.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    try:
        if args.source == 'synthetic' and args.layout == 'scannet':
            n = write_scannet_layout(args.out_bag, args.seed, args.frames, args.width,
                                     args.height)
            print(f'wrote {n} frames to {args.out_bag} (ScanNet export layout)')
            return 0
        if args.source == 'synthetic':
            n = convert_synthetic(args.out_bag, args.seed, args.frames, args.width, args.height,
                                  args.fps, args.storage, not args.no_progress)
            notes: list[str] = []
        else:
            n, notes = convert_scannet(args.scene_dir, args.out_bag, args.stride,
                                       args.max_frames, args.label_map, args.labels, args.fps,
                                       args.storage, not args.no_progress)
    except (BagError, ValueError) as err:
        print(f'sab3r-convert: error: {err}', file=sys.stderr)
        return 1
    for note in notes:
        print(f'note: {note}', file=sys.stderr)
    print(f'wrote {n} frames to {args.out_bag} ({args.storage})')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
