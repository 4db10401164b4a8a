"""Runtime configuration: frozen dataclasses, one section per subsystem.

Every runtime knob is declared exactly once here, with its description, unit and valid range,
via :func:`param`. The ROS node declares its parameters from these dataclasses
(``ros/params.py``), and ``config/perception.yaml`` is generated from them (a test keeps them in
step). Nothing here parses YAML or imports ROS: :func:`config_from_flat` builds a validated
:class:`PerceptionConfig` from a flat ``{'section.name': value}`` mapping, whatever produced it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
import math
import textwrap
from types import MappingProxyType
from typing import Any

PARAM_META = 'ros2_sab3r.param'
# Prompting of the text tower (model.text_prompts), see ros2_sab3r/model/text.py.
TEXT_PROMPTS = ('raw', 'single', 'ensemble')
# Scoring of a Locate query (query.relevancy_mode), see ros2_sab3r/query/engine.py.
RELEVANCY_MODES = ('lerf', 'official', 'calibrated')
# Options of the stand-in backend's synthetic scene (model.standin_scene) and of the deliberate
# errors of its perturbed variant, with their types; see ros2_sab3r/sim/standin.py.
STANDIN_SCENE_OPTIONS = MappingProxyType(
    {'seed': int, 'frames': int, 'width': int, 'height': int, 'fps': float})
STANDIN_PERTURBATIONS = MappingProxyType({'pose_noise_deg': float, 'swap': str})
STANDIN_SCENE_EXAMPLE = 'seed=0,frames=48,width=256,height=192,fps=5'


@dataclass(frozen=True)
class ParamSpec:
    """What a parameter means and which values are valid."""

    description: str
    unit: str = ''
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    # True: takes effect on configure (settable while unconfigured, refused while configured);
    # False: applied live to the running node, pipeline and query engine.
    read_only: bool = False

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            values = value if isinstance(value, (list, tuple)) else [value]
        else:
            if not math.isfinite(float(value)):
                raise ValueError(f'{name}={value!r} must be a finite number')
            if self.min is not None and value < self.min:
                raise ValueError(f'{name}={value!r} is below its minimum {self.min}')
            if self.max is not None and value > self.max:
                raise ValueError(f'{name}={value!r} is above its maximum {self.max}')
            values = []
        if self.choices is not None:
            for v in values:
                if v not in self.choices and not _is_plugin_path(name, v):
                    raise ValueError(f'{name}={v!r} is not one of {", ".join(self.choices)}')


def _is_plugin_path(name: str, value: Any) -> bool:
    # model.backend may name a class as 'package.module:Class' (stand-ins, third-party backends).
    return name == 'model.backend' and isinstance(value, str) and ':' in value


def param(default: Any, description: str, **spec: Any) -> Any:
    """A dataclass field carrying a :class:`ParamSpec`; lists become tuples (frozen)."""
    meta = {PARAM_META: ParamSpec(description=description, **spec)}
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NodeConfig:
    autostart: bool = param(
        True, 'configure and activate the lifecycle node on start-up; false when a lifecycle '
        'manager drives it', read_only=True)
    # Not the launch directory: a node started from a launch file has no meaningful cwd.
    map_directory: str = param(
        '', 'absolute directory that relative SaveMap/LoadMap paths resolve against; empty: '
        '$ROS_HOME/maps (~/.ros/maps), made on first save')


@dataclass(frozen=True)
class CameraConfig:
    image_topics: tuple[str, ...] = param(
        ['/camera/color/image_raw'],
        'sensor_msgs/Image topics, one per camera (remap or set per robot)', read_only=True)
    camera_info_topics: tuple[str, ...] = param(
        ['/camera/color/camera_info'],
        'sensor_msgs/CameraInfo topics, same order as image_topics; empty entries mean '
        'intrinsics are estimated from the pointmap', read_only=True)
    compressed: bool = param(
        False, 'subscribe to sensor_msgs/CompressedImage on <image_topic>/compressed instead',
        read_only=True)
    queue_size: int = param(
        2, 'frames kept per camera before the oldest is dropped; also the history depth of its '
        'subscriptions', unit='frames', min=1, max=10, read_only=True)
    # Best effort (the sensor-data convention) matches every publisher but loses large frames
    # sent across processes (measured: 4 of 10 at 640x480, none at 4000x3000); reliable got 10
    # of 10 but never matches a best-effort publisher and back-pressures the driver.
    qos_reliability: str = param(
        'best_effort', "camera subscriptions: 'best_effort' (matches any publisher, loses large "
        "frames) or 'reliable' (no loss; needs reliable publishers)",
        choices=('reliable', 'best_effort'),
        read_only=True)
    # A 388 KB PNG can declare 20000x20000 pixels (1.2 GB as RGB): the size is read from the
    # header and checked before decoding. The default admits 4096x4096 (and 4000x3000).
    max_image_pixels: int = param(
        16_777_216, 'frames with more pixels (width x height, read before decoding) are dropped '
        'and counted', unit='pixels', min=1, max=1_073_741_824)


@dataclass(frozen=True)
class FramesConfig:
    map_frame: str = param('map', 'frame of the semantic map and of Locate answers by default',
                           read_only=True)
    pose_source: str = param(
        'none', "'tf': camera poses from TF at the image stamp; 'none': from SAB3R, map "
        'anchored at the first keyframe', choices=('none', 'tf'), read_only=True)
    # REP-105: in unposed mode the node is a localizer. When TF gives the camera in odom_frame,
    # it publishes map -> odom_frame (the robot keeps odom -> base -> camera); else map ->
    # estimate_frame, a frame of its own. Never map -> the camera's frame: a second parent.
    odom_frame: str = param(
        'odom', "pose_source 'none': frame the node publishes map -> odom_frame into when TF "
        'gives the camera in it')
    estimate_frame: str = param(
        'sab3r_camera', "pose_source 'none': the camera pose estimate's own frame (map -> it) "
        'when TF does not connect the camera to odom_frame')
    tf_timeout_s: float = param(
        0.05, "pose_source 'tf': how long the worker waits for the camera's TF at the image "
        'stamp before skipping the frame', unit='s', min=0.0, max=5.0)
    # Several rigidly mounted cameras whose views need not overlap (front/back): the static TF
    # base_frame -> camera is each camera's T_BC (Pipeline.set_extrinsics), read once per camera.
    base_frame: str = param(
        '', "pose_source 'none': body frame of the cameras; TF base_frame -> camera places "
        "cameras whose views do not overlap ('' = off)", read_only=True)


@dataclass(frozen=True)
class ModelConfig:
    # 'none' is the explicit way to run without a network (tests, wiring checks); a built-in
    # backend with no model.checkpoint refuses to configure instead of running without a map.
    backend: str = param(
        'torch',
        "inference backend: 'torch', 'onnxruntime', 'tensorrt', a 'module:Class' path, or 'none' "
        '(no network, no map)', choices=('torch', 'onnxruntime', 'tensorrt', 'none'),
        read_only=True)
    checkpoint: str = param(
        '', 'network weights: checkpoint file, directory or Hugging Face repo[/file] (torch); '
        'sab3r-export directory (onnxruntime, tensorrt)', read_only=True)
    architecture: str = param(
        '', 'torch: architecture name (sab3r_cd, mast3r_vitl_512, ...) or JSON file; empty: '
        'the one the checkpoint implies', read_only=True)
    device: str = param('cpu', "'cpu' or 'cuda'", choices=('cpu', 'cuda'), read_only=True)
    # int8: the export's dynamically quantised graphs (int8 matmul weights, activations
    # quantised per run; convolutions stay fp32), see the README's 'Inference backends'.
    dtype: str = param(
        'fp32', 'backbone precision (heads stay fp32): fp16/bf16 on torch or TensorRT; int8 on '
        "onnxruntime's CPU (sab3r-export --int8)",
        choices=('fp32', 'fp16', 'bf16', 'int8'), read_only=True)
    image_width: int = param(
        512, 'network input width (a multiple of 16); frames are resized to cover width x '
        'height, then centre-cropped', unit='px', min=32,
        max=1024, read_only=True)
    image_height: int = param(
        384, 'network input height (a multiple of 16; 384 suits 4:3 cameras, 288 16:9); '
        'exports are built per size', unit='px', min=32, max=1024,
        read_only=True)
    # open_clip 'ViT-B-16' with QuickGELU, the CLIP head's space. Empty: the one
    # open_clip*/text_encoder* file in the checkpoint directory. A 'module:Class'
    # stand-in is built as Class(dim=...). Other pretrained weights (LAION, DataComp,
    # ...) are refused unless text_encoder_allow_other_weights.
    text_encoder: str = param(
        '', "CLIP ViT-B/16 text tower with OpenAI's weights: open_clip file, 'openai' (HF "
        "cache) or 'module:Class'; empty: beside checkpoint", read_only=True)
    # Other weights embed into a different space than the CLIP head, so queries match noise.
    text_encoder_allow_other_weights: bool = param(
        False, "accept ViT-B-16 text weights other than OpenAI's; experiments only (logged as "
        'an error)', read_only=True)
    # 'single' is the official VOC evaluation's prompt; 'ensemble' averages the 80
    # CLIP ImageNet templates.
    text_prompts: str = param(
        'raw', "query text for the tower: 'raw' as typed (official demo), 'single' 'a photo of "
        "a {query}', 'ensemble' 80 CLIP templates", choices=TEXT_PROMPTS, read_only=True)
    cpu_threads: int = param(
        0, 'CPU threads of torch and of ONNX Runtime (intra-op); 0: the runtime default (all '
        'cores)', unit='threads', min=0, max=256, read_only=True)
    ort_optimization: str = param(
        'all', 'ONNX Runtime graph optimisation level (rotary fusions that would corrupt the 2D '
        'RoPE are always disabled)', choices=('disable', 'basic', 'extended', 'all'),
        read_only=True)
    cuda_graphs: bool = param(
        False, 'torch on CUDA: capture encoder and decoder as CUDA graphs (static shapes; less '
        'launch overhead)', read_only=True)
    # The release DPT heads interpolate features from the 1/16 patch grid up to every pixel,
    # so averaging n x n pixels loses little (README: 'Feature pooling'). torch pools on its
    # device, before the copy to the host; other backends' features are pooled on arrival.
    feature_pool: int = param(
        1, 'average semantic features over n x n pixels (1, 2, 4 or 8) before fusion: n^2 '
        'fewer bytes copied off the GPU, held and fused', unit='px', min=1, max=8,
        read_only=True)
    # Options (STANDIN_SCENE_OPTIONS) left out keep SceneSpec's defaults
    # (seed=0,frames=48,width=256,height=192,fps=5); PerturbedSceneBackend reads
    # ';pose_noise_deg=DEG,swap=CLASS:CLASS' after the scene.
    standin_scene: str = param(
        '', 'stand-in backends only (ros2_sab3r.sim.standin): their synthetic scene, e.g. '
        "'seed=0,frames=48'; empty: defaults", read_only=True)
    # Options after ';' are ros2_sab3r.sim.oracle.OracleNoise fields (regime,
    # clip_noise, depth_noise, scale_jitter, dino_dim, feature_stride, seed).
    oracle: str = param(
        '', "ORACLE backend only (ros2_sab3r.eval.oracle:BagOracleBackend): the bag it answers "
        "from, e.g. 'scene.bag;regime=cliplike'", read_only=True)
    # Engines are keyed by GPU, TensorRT version and ONNX hash.
    engine_cache_dir: str = param(
        '', "tensorrt: directory of built engines and the timing cache; empty: 'engines' in "
        'the export directory', read_only=True)


@dataclass(frozen=True)
class KeyframeConfig:
    window_size: int = param(
        8, 'keyframes kept in the sliding window', unit='keyframes', min=2, max=64,
        read_only=True)
    min_overlap: float = param(
        0.35, 'a frame becomes a keyframe when its overlap with the latest one (share of '
        'reciprocally matched seeds) drops below this', unit='ratio', min=0.0, max=1.0)
    pairs_per_keyframe: int = param(
        3, 'window keyframes (the most recent) a new keyframe is decoded against', unit='pairs',
        min=1, max=16)
    # 16 at 512x384 is 768 seeds (~1 ms on the 2-core development machine), 8 is
    # 3072 seeds (~15 ms); on the synthetic scene both give overlaps within 0.03
    # and the same keyframes. Lower it if a real model's less smooth descriptors
    # make keyframes come too early.
    match_stride: int = param(
        16, 'pixel spacing of the reciprocal-matching seed grid that measures overlap; cost '
        'grows with the inverse 4th power', unit='px', min=2, max=64)
    # The overlap test alone let tracked frames see parts of objects no keyframe saw (the
    # ScanNet-layout acceptance scene: lamps and bookshelves got half-width boxes, IoU 0.73).
    max_unmapped: float = param(
        0.3, 'unposed mode: a frame also becomes a keyframe when this share of its confident '
        'points lies where no keyframe was (1 = off)', unit='ratio', min=0.0, max=1.0)
    min_translation_m: float = param(
        0.25, 'posed mode: a frame becomes a keyframe when it moved this far from the latest '
        'keyframe', unit='m', min=0.0, max=100.0)
    min_rotation_deg: float = param(
        15.0, 'posed mode: a frame becomes a keyframe when it turned this much from the latest '
        'keyframe', unit='deg', min=0.0, max=180.0)


@dataclass(frozen=True)
class GeometryConfig:
    min_confidence: float = param(
        1.5, 'pointmap confidence below which points are not used for pose estimation',
        min=0.0, max=1000.0)
    min_points: int = param(
        200, 'confident points a pair needs before its pose or scale is trusted', unit='points',
        min=10, max=1_000_000)
    max_points_per_pair: int = param(
        4000, 'points sampled per pair for registration and window refinement', unit='points',
        min=100, max=1_000_000)
    refine_iterations: int = param(
        20, 'least-squares iterations of the window refinement (new keyframe pose and per-pair '
        'scales); 0 disables it', min=0, max=200)
    # Pure rotation cannot fix the scale.
    min_baseline_m: float = param(
        0.05, "posed mode: camera translation needed before the first keyframe's metric scale "
        'is fixed', unit='m', min=0.001, max=10.0)
    max_registration_rmse: float = param(
        0.1, 'a keyframe is rejected when its registration RMS residual, relative to the '
        'median scene depth, exceeds this', unit='ratio', min=0.001, max=10.0)


# mapping.feature_codec values (ros2_sab3r.mapping.codec implements them)
FEATURE_CODECS = ('bf16', 'int8', 'pca_int8')


@dataclass(frozen=True)
class MappingConfig:
    voxel_size_m: float = param(0.05, 'edge of a map voxel', unit='m', min=0.005, max=1.0,
                                read_only=True)
    min_confidence: float = param(
        1.5, 'pointmap confidence below which points are not fused', min=0.0, max=1000.0,
        read_only=True)
    max_voxels: int = param(
        500_000, 'voxels kept; beyond this the least recently seen are evicted', unit='voxels',
        min=1000, max=50_000_000, read_only=True)
    # Stops class halos at depth edges where features are coarser than pixels.
    feature_edge_tolerance: float = param(
        0.05, "a pixel takes its feature cell's feature only if its depth is within this "
        "fraction of the cell centre's; 0: off", unit='ratio', min=0.0,
        max=10.0, read_only=True)
    # 2 about halves integration time; on the synthetic acceptance scene
    # (256x192) it raised the worst class-centroid error from 6 to 9.5 cm and
    # lowered the worst box IoU from 0.70 to 0.52: keep 1 unless integration
    # is the bottleneck.
    integration_stride: int = param(
        1, 'fuse every n-th pixel of a keyframe in each direction: faster, but holes and '
        'fewer feature samples per voxel',
        unit='px', min=1, max=8, read_only=True)
    fuse_dino: bool = param(
        True, 'also fuse DINO features when the backend provides them (used to split touching '
        'instances; doubles feature memory)', read_only=True)
    # int8 halves the CLIP bytes every Locate reads; cosines move by ~1e-3 (bounded at 1e-2 in
    # tests/mapping/test_feature_codec.py). pca_int8 keeps int8 codes of a projection fitted to
    # the map (CLIP and DINO), refitted when new features leave its span (mapping.codec).
    # Map files store what memory holds (format 3).
    feature_codec: str = param(
        'bf16', "map features: 'bf16', 'int8' (per-voxel scale) or 'pca_int8' (int8 codes of a "
        'projection fitted to the map)', choices=FEATURE_CODECS, read_only=True)
    clip_projection_dim: int = param(
        128, "pca_int8: CLIP channels kept (the projection's rank); bytes per voxel grow by 1 "
        'per channel', unit='channels', min=8, max=4096, read_only=True)
    dino_projection_dim: int = param(
        64, 'pca_int8: DINO channels kept (DINO only splits and merges instances)',
        unit='channels', min=8, max=4096, read_only=True)
    projection_refit_residual: float = param(
        0.1, "pca_int8: refit the projection when a keyframe's cells have this much more of their "
        "energy outside it than the fit's typical cell", unit='ratio', min=0.0, max=1.0,
        read_only=True)
    # Unposed maps have no known gravity and use PCA boxes.
    gravity_in_map: tuple[float, ...] = param(
        [0.0, 0.0, -1.0], 'gravity direction in the map frame when poses come from outside '
        '(REP-103 maps: z-up); boxes are gravity-aligned', unit='unit vector', read_only=True)


@dataclass(frozen=True)
class QueryConfig:
    # 'calibrated' (see vocabulary below) decides FOUND/NOT_FOUND independently of
    # the absolute cosine scale; 'lerf' applies default_min_score; 'official'
    # min-max normalises the cosine over the map and keeps voxels at
    # official_threshold or above (negatives unused).
    relevancy_mode: str = param(
        'calibrated', "default scoring: 'calibrated' query vs a vocabulary; 'lerf' softmax vs "
        "negatives; 'official' SAB3R demo's min-max cosine",
        choices=RELEVANCY_MODES)
    # The SAB3R demo uses 0.75.
    official_threshold: float = param(
        0.75, 'official mode: normalised score a voxel needs to belong to a query when the '
        "request's min_score is 0", min=0.0, max=1.0)
    default_top_k: int = param(
        5, 'objects returned per query when the request asks for 0', min=1, max=100)
    default_min_score: float = param(
        0.85, 'relevancy a voxel needs to belong to a query, and an instance to be FOUND, '
        'when the request asks for 0', min=0.0, max=1.0)
    canonical_negatives: tuple[str, ...] = param(
        ['object', 'things', 'stuff', 'texture'],
        'negative phrases every query is compared against (LERF-style relevancy)')
    max_queries: int = param(64, 'queries accepted in one Locate request', min=1, max=1024)
    max_query_chars: int = param(
        256, 'longest query or negative string accepted', unit='characters', min=1, max=10_000)
    temperature: float = param(
        0.05, 'divides cosine similarities before the softmax against each negative; smaller '
        'is sharper (CLIP itself: 0.01)', min=0.001, max=10.0)
    min_instance_voxels: int = param(
        10, 'connected groups of relevant voxels smaller than this are ignored', unit='voxels',
        min=1, max=1_000_000)
    ambiguity_margin: float = param(
        0.05, 'status is AMBIGUOUS when the runner-up instance scores within this of the best, or '
        'the best is within this of min_score', min=0.0, max=1.0)
    # Rejects mixed voxels on object borders.
    membership_fraction: float = param(
        0.5, "a relevant voxel joins a query only if its similarity lies this far from the map's "
        "median towards the query's clearest voxels", unit='ratio', min=0.0, max=1.0)
    dino_split_similarity: float = param(
        0.5, 'neighbouring voxels join one instance only when their DINO features are at least '
        'this similar (when DINO features exist)', unit='cosine', min=-1.0, max=1.0)
    embedding_cache_size: int = param(
        1024, 'text embeddings kept in memory', unit='texts', min=0, max=1_000_000)
    # The product reads every voxel's CLIP feature (0.5 GB at 500k voxels). On the
    # 2-core development machine at 500k voxels: 1 worker 65-75 ms, 2 workers ~40 ms
    # (~60 ms while another process keeps a core busy); torch's own 2 threads
    # 80-280 ms then.
    threads: int = param(
        2, 'Locate similarity workers, each running torch on one thread over blocks of '
        "voxels; 0: the caller with torch's threads", unit='threads',
        min=0, max=64)
    # Defaults measured with sab3r-eval --oracle --oracle-noise regime=cliplike on
    # synthetic seeds 0-3: present objects score >= 0.66 at z >= 2.4, the best
    # absent-class candidates <= 0.60 at z <= 2.2 (README, Map-and-Locate).
    # 'calibrated' mode: each candidate instance is asked whether the query beats
    # every word of this vocabulary (plus the request's negatives and
    # canonical_negatives), in units of the spread of the vocabulary's cosines
    # there, so the decision does not depend on the absolute cosine scale.
    vocabulary: tuple[str, ...] = param(
        ['wall', 'floor', 'ceiling', 'door', 'window', 'table', 'chair', 'sofa', 'bed',
         'cabinet', 'shelves', 'bookshelf', 'desk', 'dresser', 'counter', 'curtain', 'blinds',
         'picture', 'mirror', 'pillow', 'lamp', 'television', 'monitor', 'computer', 'box',
         'bag', 'books', 'paper', 'towel', 'clothes', 'plant', 'person', 'toilet', 'sink',
         'bathtub', 'refrigerator', 'oven', 'microwave', 'bottle', 'cup', 'bowl', 'clock',
         'vase', 'rug', 'floor mat', 'whiteboard', 'radiator', 'stairs', 'railing', 'column',
         'pipe', 'fan', 'light', 'switch', 'night stand', 'stool', 'bench', 'trash can',
         'printer', 'keyboard', 'laptop', 'telephone', 'basket', 'bucket', 'suitcase'],
        'calibrated mode: common object names a query competes against at each candidate '
        'instance')
    vocabulary_min_z: float = param(
        2.0, "calibrated mode: the query's cosine at an instance must exceed the vocabulary's "
        'mean there by this many standard deviations', unit='std', min=0.0, max=100.0)
    # Real CLIP ViT-B/16: 'sofa'/'couch' ~0.9, 'chair'/'sofa' ~0.8 (text-text).
    synonym_similarity: float = param(
        0.9, 'calibrated mode: vocabulary words at least this similar to the query (text '
        'embeddings) do not compete with it', unit='cosine', min=-1.0, max=1.0)
    calibrated_min_score: float = param(
        0.62, "calibrated mode: an instance's score (query vs its strongest competitor) needed "
        'to be FOUND when the request asks for 0', min=0.0, max=1.0)
    # Splits of one object (a gap in the relevant voxels, a thin part) are joined.
    merge_gap_m: float = param(
        0.15, 'instances of one query closer than this, with similar DINO features, are one '
        'object (0: never merged)', unit='m', min=0.0, max=10.0)
    # Bounds the vocabulary check on large maps (its cost grows with the candidates).
    max_candidate_voxels: int = param(
        20_000, 'calibrated mode: at most this many of the most similar voxels are checked '
        'against the vocabulary', unit='voxels', min=100, max=10_000_000)
    # Fragments: a few voxels of an object fused elsewhere (a depth edge, a
    # registration slip), or background that happens to lean towards the query.
    min_relative_size: float = param(
        0.1, "calibrated mode: instances smaller than this share of the query's largest "
        'FOUND instance are dropped as fragments', unit='ratio', min=0.0, max=1.0)
    estimate_gravity: bool = param(
        True, 'unposed maps: estimate gravity from the floor plane (cameras look level) so '
        'boxes are upright; false: PCA boxes')


@dataclass(frozen=True)
class PublishConfig:
    map_rate_hz: float = param(
        1.0, 'semantic map publication rate (only while subscribed)', unit='Hz', min=0.0,
        max=30.0)
    status_rate_hz: float = param(1.0, 'PerceptionStatus publication rate', unit='Hz', min=0.1,
                                  max=50.0)
    map_labels: tuple[str, ...] = param(
        ('wall', 'floor', 'ceiling', 'door', 'window', 'table', 'chair', 'sofa', 'bed',
         'cabinet', 'shelf', 'television', 'person', 'plant'),
        "closed-set labels for the map cloud's 'label' (index; -1: no CLIP feature) and "
        "'score' fields; empty: no such fields")


@dataclass(frozen=True)
class PerceptionConfig:
    node: NodeConfig = field(default_factory=NodeConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def validate(self) -> PerceptionConfig:
        """Check every value and the cross-field rules; return self so calls chain."""
        for name, value, spec in iter_params(self):
            spec.check(name, value)
        cam = self.camera
        if not cam.image_topics:
            raise ValueError('camera.image_topics is empty: name at least one image topic')
        if cam.camera_info_topics and len(cam.camera_info_topics) != len(cam.image_topics):
            raise ValueError(
                f'camera.camera_info_topics has {len(cam.camera_info_topics)} entries but '
                f'camera.image_topics has {len(cam.image_topics)}; give one per image topic or '
                'none')
        for name in ('image_width', 'image_height'):
            if getattr(self.model, name) % 16:
                raise ValueError(f'model.{name}={getattr(self.model, name)} must be a multiple '
                                 'of 16 (the patch size)')
        if self.model.feature_pool not in (1, 2, 4, 8):
            raise ValueError(f'model.feature_pool={self.model.feature_pool} must be 1, 2, 4 or 8 '
                             '(it divides the network input, a multiple of 16)')
        if not self.frames.map_frame:
            raise ValueError('frames.map_frame must not be empty')
        parse_standin_scene(self.model.standin_scene)
        gravity = self.mapping.gravity_in_map
        if len(gravity) != 3 or not 0.5 < math.sqrt(sum(g * g for g in gravity)) < 1.5:
            raise ValueError(
                f'mapping.gravity_in_map={gravity!r} must be 3 numbers of length 1, e.g. '
                '[0.0, 0.0, -1.0] for a z-up map')
        return self


def _parse_options(text: str, types: Mapping[str, type], what: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(','))):
        key, sep, value = item.partition('=')
        key, value = key.strip(), value.strip()
        if not sep or key not in types:
            raise ValueError(f'model.standin_scene: bad {what} option {item!r}; expected '
                             f'NAME=VALUE with NAME one of {", ".join(types)}')
        if types[key] is str:
            values[key] = value
            continue
        try:
            values[key] = types[key](value)
        except ValueError as err:
            raise ValueError(f'model.standin_scene: {what} option {key}={value!r} is not '
                             f'{"an integer" if types[key] is int else "a number"}') from err
        if not math.isfinite(values[key]):
            raise ValueError(f'model.standin_scene: {what} option {key}={value!r} must be finite')
    return values


def parse_standin_scene(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model.standin_scene`` -> (scene options, perturbations), each ``{name: value}``.

    The text is comma-separated ``NAME=VALUE`` scene options (:data:`STANDIN_SCENE_OPTIONS`),
    optionally followed by ``;`` and perturbations (:data:`STANDIN_PERTURBATIONS`). A leading
    ``synthetic:`` is accepted: bags written by ``sab3r-convert synthetic`` record the scene so.
    Raises ValueError naming the bad option.
    """
    text = text.strip()
    text = text[len('synthetic:'):] if text.startswith('synthetic:') else text
    scene_text, _, perturb_text = text.partition(';')
    scene = _parse_options(scene_text, STANDIN_SCENE_OPTIONS, 'scene')
    perturb = _parse_options(perturb_text, STANDIN_PERTURBATIONS, 'perturbation')
    for key, least in (('frames', 2), ('width', 32), ('height', 32)):
        if scene.get(key, least) < least:
            raise ValueError(f'model.standin_scene: {key}={scene[key]} is below {least}; the '
                             'scene is too small to map')
    if scene.get('fps', 1.0) <= 0:
        raise ValueError(f'model.standin_scene: fps={scene["fps"]} must be positive')
    if perturb.get('pose_noise_deg', 0.0) < 0:
        raise ValueError('model.standin_scene: pose_noise_deg must not be negative')
    swap = perturb.get('swap')
    if swap is not None:
        pair = tuple(swap.split(':'))
        if len(pair) != 2 or not all(pair):
            raise ValueError(f'model.standin_scene: swap={swap!r} must be CLASS:CLASS, e.g. '
                             'chair:sofa')
        perturb['swap'] = pair
    return scene, perturb


@dataclass(frozen=True)
class ParamInfo:
    name: str  # dotted: 'section.field'
    default: Any
    spec: ParamSpec


def param_infos(cfg_type: type = PerceptionConfig) -> list[ParamInfo]:
    """All parameters of the configuration, in declaration order, with their defaults."""
    out = []
    for section in fields(cfg_type):
        section_type = section.default_factory  # type: ignore[misc]
        for f in fields(section_type):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore
            out.append(ParamInfo(f'{section.name}.{f.name}', default, f.metadata[PARAM_META]))
    return out


def iter_params(cfg: PerceptionConfig):
    """Yield (dotted name, value, spec) for every parameter of a config instance."""
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        assert is_dataclass(sub)
        for f in fields(sub):
            yield f'{section.name}.{f.name}', getattr(sub, f.name), f.metadata[PARAM_META]


def config_from_flat(values: Mapping[str, Any], base: PerceptionConfig | None = None
                     ) -> PerceptionConfig:
    """Build a validated config from ``{'section.field': value}``; unknown names are errors."""
    cfg = base or PerceptionConfig()
    known = {p.name: p for p in param_infos()}
    updates: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f'unknown parameter {name!r}')
        default = known[name].default
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(default):
            raise ValueError(f'{name}={value!r} must be of type {type(default).__name__}')
        section, key = name.split('.', 1)
        updates.setdefault(section, {})[key] = value
    for section, kv in updates.items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **kv)})
    return cfg.validate()


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, tuple):
        return '[' + ', '.join(_yaml_value(v) for v in value) + ']'
    return repr(value)


def render_params_yaml() -> str:
    """config/perception.yaml as generated from the dataclasses (descriptions become comments).

    Regenerate after changing a parameter: ``python -m ros2_sab3r.config > config/perception.yaml``
    (a test fails while the file and this module disagree).
    """
    lines = [
        '# ros2_sab3r perception node parameters: every parameter, with its default.',
        '# Generated by `python -m ros2_sab3r.config`; edit ros2_sab3r/config.py, not this file,',
        '# and copy this file to make a robot-specific overlay (pass it as params_file:=...).',
        '/**:',
        '  ros__parameters:',
    ]
    section = None
    for info in param_infos():
        sec, key = info.name.split('.', 1)
        if sec != section:
            lines.append(f'    {sec}:')
            section = sec
        spec = info.spec
        notes = []
        if spec.unit:
            notes.append(spec.unit)
        if spec.min is not None or spec.max is not None:
            notes.append(f'range [{spec.min}, {spec.max}]')
        if spec.choices:
            notes.append('one of ' + ', '.join(spec.choices))
        if spec.read_only:
            notes.append('read-only while configured')
        comment = spec.description + (f' ({"; ".join(notes)})' if notes else '')
        lines.extend(textwrap.wrap(comment, 99, initial_indent='      # ',
                                   subsequent_indent='      #   '))
        lines.append(f'      {key}: {_yaml_value(info.default)}')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    import sys

    sys.stdout.write(render_params_yaml())
