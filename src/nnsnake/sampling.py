"""Training patch sampling with foreground oversampling (docs/method.md §5.4) and the patch geometry of §5.5.

A batch draws its cases uniformly with replacement; the last ``bs - round(bs * (1 - 0.33))`` samples are
forced to be centred on a foreground voxel so that small structures are seen often enough. The training
loader reads an enlarged patch ``P0`` (big enough that rotating and scaling it still fills ``P``); the
spatial transform later cuts ``P`` out of its centre. 2d configurations sample one slice of the 3D volume.

The loader is a batchgenerators v1 ``DataLoader``, so the batchgenerators augmenters can run it in
background processes. Augmentation runs per sample inside the loader (the same split of work as nnU-Net),
so a batch leaves a worker fully augmented.

Randomness: without a seed the loader uses the global numpy / torch generators, as nnU-Net does. With a seed
it keeps private generator states, swapped in around each batch and derived from ``(seed, worker id)``
(worker 0 when in-process). This makes runs reproducible, and in-process the state can be saved and restored
for bit-exact resumes. (Hence the legacy ``np.random`` calls: they share the global stream the transforms use.)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.dataloading.data_loader import DataLoader
from numpy.typing import DTypeLike

OVERSAMPLE_FOREGROUND_PERCENT = 0.33
ANISOTROPY_THRESHOLD = 3  # max(P) / P[0] above this switches 3D augmentation to dummy 2D
ROTATION_3D_DEG = 30.0
ROTATION_DUMMY_2D_DEG = 180.0
ROTATION_2D_ELONGATED_DEG = 15.0  # 2D patches with max/min > 1.5
ROTATION_2D_DEG = 180.0
ELONGATED_2D_RATIO = 1.5
INITIAL_PATCH_MAX_ROTATION_DEG = 90.0
INITIAL_PATCH_MIN_SCALE = 0.85
DATA_PAD_VALUE = 0
SEG_PAD_VALUE = -1
ANNOTATED_KEY = -1  # class_locations key of all annotated voxels when the dataset has an ignore label
# Cases kept in memory per process (least recently used evicted): opening a stored case costs ~1 ms, which
# is most of the sampling time for small 2d patches (366 per Hippocampus batch).
CASE_CACHE_BYTES = 512 * 2**20

LoadCase = Callable[[str], tuple[np.ndarray, np.ndarray, Mapping[str, Any]]]
LoadPreviousStage = Callable[[str], np.ndarray]


# --------------------------------------------------------------------------------------------------------
# Patch geometry (§5.5)
# --------------------------------------------------------------------------------------------------------
def rotation_and_dummy_2d(patch_size: Sequence[int]) -> tuple[tuple[float, float], bool]:
    """Rotation range in radians and whether 3D augmentation runs in-plane (dummy 2D) for a plans patch size.

    Strongly anisotropic 3D patches (first axis much shorter) are augmented slice-wise: rotating them out of
    plane would mix the coarse axis into the fine ones.
    """
    patch_size = [int(p) for p in patch_size]
    if len(patch_size) == 2:
        dummy_2d = False
        elongated = max(patch_size) / min(patch_size) > ELONGATED_2D_RATIO
        degrees = ROTATION_2D_ELONGATED_DEG if elongated else ROTATION_2D_DEG
    elif len(patch_size) == 3:
        dummy_2d = max(patch_size) / patch_size[0] > ANISOTROPY_THRESHOLD
        degrees = ROTATION_DUMMY_2D_DEG if dummy_2d else ROTATION_3D_DEG
    else:
        raise ValueError(f"patch size {patch_size} must have 2 or 3 axes")
    radians = math.radians(degrees)
    return (-radians, radians), dummy_2d


def mirror_axes(patch_size: Sequence[int]) -> tuple[int, ...]:
    """Mirroring is allowed along every spatial axis (also the axes test-time mirroring may use)."""
    return tuple(range(len(patch_size)))


def initial_patch_size(
    patch_size: Sequence[int], rotation_range: float | Sequence[float], dummy_2d: bool
) -> tuple[int, ...]:
    """Enlarged patch ``P0`` the training loader reads so that rotation / zoom-out still fill ``P``.

    The patch's corner vector is rotated about each axis by the largest rotation (capped at 90°), the per-axis
    absolute maxima (with ``P``) are divided by 0.85 and truncated. With dummy 2D the first axis is not
    rotated and keeps ``P[0]``. Hippocampus 40×56×40 gives 73×80×64.
    """
    if isinstance(rotation_range, (int, float)):
        angle = abs(float(rotation_range))
    else:
        angle = max(abs(float(a)) for a in rotation_range)
    angle = min(angle, math.radians(INITIAL_PATCH_MAX_ROTATION_DEG))
    corner = np.array(patch_size, dtype=float)
    extent = corner.copy()
    if len(corner) == 3:
        for rotation in ((angle, 0, 0), (0, angle, 0), (0, 0, angle)):
            extent = np.maximum(extent, np.abs(rotate_coords_3d(corner.copy(), *rotation)))
    elif len(corner) == 2:
        extent = np.maximum(extent, np.abs(rotate_coords_2d(corner.copy(), angle)))
    else:
        raise ValueError(f"patch size {list(patch_size)} must have 2 or 3 axes")
    enlarged = (extent / INITIAL_PATCH_MIN_SCALE).astype(int)
    if dummy_2d:
        enlarged[0] = int(patch_size[0])
    return tuple(int(e) for e in enlarged)


def forced_foreground_count(
    batch_size: int, oversample_percent: float = OVERSAMPLE_FOREGROUND_PERCENT
) -> int:
    """Number of samples per batch forced to contain foreground (the last ones of the batch)."""
    return batch_size - round(batch_size * (1 - oversample_percent))


def probabilistic_oversampling_p(
    batch_size: int, oversample_percent: float = OVERSAMPLE_FOREGROUND_PERCENT
) -> float:
    """Per-sample probability of a forced foreground patch under probabilistic oversampling.

    As nnUNetTrainer_probabilisticOversampling: the share of the batch that the "last k" rule forces at the
    plans' batch size, so on average as many patches are forced (bs 2 -> 0.5, 9 -> 1/3, 58 -> 19/58).
    """
    return forced_foreground_count(batch_size, oversample_percent) / batch_size


# --------------------------------------------------------------------------------------------------------
# Crop with padding
# --------------------------------------------------------------------------------------------------------
def crop_with_pad(
    array: np.ndarray, lower: Sequence[int], size: Sequence[int], pad_value: float, dtype: DTypeLike
) -> np.ndarray:
    """Copy the box ``[lower, lower + size)`` of the spatial axes of ``array`` (C, *spatial), padding outside.

    Only the part inside the array is read, which keeps memory-mapped reads small.
    """
    spatial = array.shape[1:]
    out = np.full((array.shape[0], *size), pad_value, dtype=dtype)
    src, dst = [slice(None)], [slice(None)]
    for lo, sz, extent in zip(lower, size, spatial, strict=True):
        a, b = max(lo, 0), min(lo + sz, extent)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[tuple(dst)] = array[tuple(src)]
    return out


# --------------------------------------------------------------------------------------------------------
# Private random state
# --------------------------------------------------------------------------------------------------------
def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from ``seed`` and integer keys (worker id, epoch, loader role)."""
    return int(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in keys)).generate_state(1)[0])


class _PrivateRandomState:
    """numpy and torch global-generator states that are swapped in only while a batch is built.

    batchgenerators(v2) transforms draw from the global generators, so isolating them this way keeps the data
    pipeline's random stream independent of the trainer's (weight init, dropout) and makes it checkpointable.
    """

    def __init__(self, seed: int) -> None:
        self.numpy_state: Any = np.random.RandomState(derive_seed(seed, 0)).get_state()  # legacy tuple form
        generator = torch.Generator()
        generator.manual_seed(derive_seed(seed, 1))
        self.torch_state = generator.get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved_numpy, saved_torch = np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
        np.random.set_state(self.numpy_state)  # noqa: NPY002
        torch.set_rng_state(self.torch_state)
        try:
            yield
        finally:
            self.numpy_state, self.torch_state = np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
            np.random.set_state(saved_numpy)  # noqa: NPY002
            torch.set_rng_state(saved_torch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
        name, keys, position, has_gauss, cached_gaussian = self.numpy_state
        assert name == "MT19937"
        return {
            "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "numpy_position": torch.tensor(int(position)),
            "numpy_has_gauss": torch.tensor(int(has_gauss)),
            "numpy_cached_gaussian": torch.tensor(float(cached_gaussian), dtype=torch.float64),
            "torch": self.torch_state.clone(),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.numpy_state = (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_position"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_cached_gaussian"]),
        )
        self.torch_state = state["torch"].clone()


# --------------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------------
def _normalise_class_locations(class_locations: Mapping[Any, Any] | None) -> dict[Any, np.ndarray]:
    """Keys as ints (JSON turns them into strings) or tuples (regions); values as integer arrays (N, ndim)."""
    if class_locations is None:
        return {}
    normalised = {}
    for key, value in class_locations.items():
        if isinstance(key, str):
            key = int(key)
        elif isinstance(key, list):
            key = tuple(key)
        normalised[key] = np.asarray(value, dtype=np.int64)
    return normalised


def _is_annotated_key(key: Any) -> bool:
    return key == ANNOTATED_KEY or (isinstance(key, tuple) and len(key) > 0 and key[0] == ANNOTATED_KEY)


class PatchDataLoader(DataLoader):
    """Infinite batches of (augmented) patches as nnU-Net's loader draws them (§5.4).

    ``patch_size`` is the network patch ``P`` (2 axes for 2d, 3 for 3d); ``sampling_patch_size`` is what is
    read from the case (``P0`` for training, ``P`` for validation). The batch is
    ``{'data': float32 (B, C, *P), 'target': tensor or list of tensors (one per deep-supervision scale),
    'keys': case ids}``; without ``transforms`` the raw crops of size ``sampling_patch_size`` come back with
    the seg under ``'target'``.
    """

    def __init__(
        self,
        case_ids: Sequence[str],
        load_case: LoadCase,
        batch_size: int,
        patch_size: Sequence[int],
        sampling_patch_size: Sequence[int] | None = None,
        oversample_foreground_percent: float = OVERSAMPLE_FOREGROUND_PERCENT,
        transforms: Callable[..., dict] | None = None,
        load_previous_stage: LoadPreviousStage | None = None,
        has_ignore_label: bool = False,
        seed: int | None = None,
        case_cache_bytes: int = CASE_CACHE_BYTES,
        probabilistic_oversampling: bool = False,
    ) -> None:
        if len(case_ids) == 0:
            raise ValueError(
                "PatchDataLoader needs at least one case id; check the fold's split in splits.json"
            )
        super().__init__(
            list(case_ids),
            batch_size,
            num_threads_in_multithreaded=1,
            seed_for_shuffle=None,
            return_incomplete=True,
            shuffle=False,
            infinite=True,
            sampling_probabilities=None,
        )
        self.indices = list(case_ids)
        self.load_case = load_case
        self.load_previous_stage = load_previous_stage
        self.patch_size = tuple(int(p) for p in patch_size)
        sampling_patch_size = self.patch_size if sampling_patch_size is None else sampling_patch_size
        if len(sampling_patch_size) != len(self.patch_size):
            raise ValueError(
                f"sampling patch {list(sampling_patch_size)} and patch {list(patch_size)} differ in axes"
            )
        self.is_2d = len(self.patch_size) == 2
        # a 2d patch is a one-slice 3D box on the volume; its singleton axis is dropped after cropping
        self.sampling_patch_size = ((1,) if self.is_2d else ()) + tuple(int(p) for p in sampling_patch_size)
        final = ((1,) if self.is_2d else ()) + self.patch_size
        self.need_to_pad = np.maximum(np.array(self.sampling_patch_size) - np.array(final), 0)
        self.oversample_foreground_percent = oversample_foreground_percent
        self.probabilistic_oversampling = bool(probabilistic_oversampling)
        self.transforms = transforms
        self.has_ignore_label = has_ignore_label
        self.seed = seed
        self.case_cache_bytes = int(case_cache_bytes)
        self._case_cache: OrderedDict[str, tuple] = OrderedDict()
        self._case_cache_used = 0
        # in-process loading draws the same stream as worker 0, so 0 and 1 workers give the same batches
        self._random_state = _PrivateRandomState(derive_seed(seed, 0)) if seed is not None else None

    # ---- randomness -----------------------------------------------------------------------------------
    def set_thread_id(self, thread_id: int) -> None:
        """Called once in each background worker: one torch thread, and a worker-specific random stream."""
        super().set_thread_id(thread_id)
        torch.set_num_threads(1)
        if self.seed is not None:
            self._random_state = _PrivateRandomState(derive_seed(self.seed, thread_id))

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The private random state (seeded loaders only), for checkpoints of in-process loading."""
        if self._random_state is None:
            raise RuntimeError("this loader was built without a seed; it draws from the global generators")
        return self._random_state.state_dict()

    def set_rng_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if self._random_state is None:
            raise RuntimeError(
                "this loader was built without a seed; build it with seed=... to restore a state"
            )
        self._random_state.load_state_dict(state)

    # ---- sampling -------------------------------------------------------------------------------------
    def force_foreground(self, sample_index: int) -> bool:
        """The last samples of each batch are forced to foreground (deterministic per batch position); with
        ``probabilistic_oversampling`` each sample is instead forced with probability
        ``oversample_foreground_percent`` (one uniform draw from the loader's stream per sample)."""
        if self.probabilistic_oversampling:
            return bool(np.random.uniform() < self.oversample_foreground_percent)  # noqa: NPY002
        return not sample_index < round(self.batch_size * (1 - self.oversample_foreground_percent))

    def lower_corner(
        self, shape: Sequence[int], force_fg: bool, class_locations: Mapping[Any, np.ndarray]
    ) -> list[int]:
        """Lower corner of the sampling box in voxel coordinates (may be negative: padding fills it)."""
        dims = len(shape)
        need_to_pad = self.need_to_pad.copy()
        for d in range(dims):
            if need_to_pad[d] + shape[d] < self.sampling_patch_size[d]:
                need_to_pad[d] = self.sampling_patch_size[d] - shape[d]
        lbs = [-int(need_to_pad[d]) // 2 for d in range(dims)]
        ubs = [
            int(shape[d] + need_to_pad[d] // 2 + need_to_pad[d] % 2 - self.sampling_patch_size[d])
            for d in range(dims)
        ]

        selected = None
        if force_fg:
            eligible = [k for k, v in class_locations.items() if len(v) > 0]
            annotated = [k for k in eligible if _is_annotated_key(k)]
            if annotated and len(eligible) > 1:
                eligible.remove(annotated[0])
            if eligible:
                selected = eligible[np.random.choice(len(eligible))]  # noqa: NPY002
        elif self.has_ignore_label:
            # with an ignore label every patch is centred on an annotated voxel (nnU-Net §4.3): a random crop
            # could hold nothing to learn from
            annotated = [k for k in class_locations if _is_annotated_key(k) and len(class_locations[k]) > 0]
            selected = annotated[0] if annotated else None
            if selected is None:
                warnings.warn(
                    "a case has no annotated voxel (only the ignore label, or no annotated-voxel locations: "
                    "re-preprocess after adding the ignore label); its patch is a random crop",
                    stacklevel=2,
                )

        if selected is None:  # random crop; also the fallback when a case has no foreground
            return [int(np.random.randint(lbs[d], ubs[d] + 1)) for d in range(dims)]  # noqa: NPY002
        voxels = class_locations[selected]
        voxel = voxels[np.random.choice(len(voxels))]  # noqa: NPY002
        if voxel.shape != (dims,):
            raise ValueError(
                f"class_locations[{selected!r}] holds coordinates of shape {voxel.shape}, the case has {dims} "
                "spatial axes; store spatial coordinates (N, ndim) without a channel column"
            )
        return [max(lbs[d], int(voxel[d]) - self.sampling_patch_size[d] // 2) for d in range(dims)]

    def _load(self, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
        """The case's arrays and class locations, from the in-memory cache when it is there."""
        cached = self._case_cache.get(case_id)
        if cached is not None:
            self._case_cache.move_to_end(case_id)
            return cached[:4]
        data, seg, properties = self.load_case(case_id)
        if data.ndim != 4 or seg.ndim != 4 or data.shape[1:] != seg.shape[1:]:
            raise ValueError(
                f"case {case_id}: expected data (C, z, y, x) and seg (1, z, y, x) of equal spatial shape, got "
                f"{data.shape} and {seg.shape}; 2d configurations also sample from the 3D preprocessed volume"
            )
        previous = None
        if self.load_previous_stage is not None:
            previous = np.asarray(self.load_previous_stage(case_id))
            if previous.ndim == 3:
                previous = previous[None]
            if previous.shape[1:] != seg.shape[1:]:
                raise ValueError(
                    f"case {case_id}: previous-stage segmentation has shape {previous.shape[1:]}, the case "
                    f"{seg.shape[1:]}; it must be resampled to this configuration's preprocessed shape"
                )
        class_locations = _normalise_class_locations(properties.get("class_locations"))
        size = data.nbytes + seg.nbytes + (previous.nbytes if previous is not None else 0)
        if size <= self.case_cache_bytes:
            # read memory maps into memory once; the maps (and their file handles) are released
            data, seg = np.array(data), np.array(seg)
            previous = np.array(previous) if previous is not None else None
            class_locations = {k: np.array(v) for k, v in class_locations.items()}
            self._case_cache[case_id] = (data, seg, previous, class_locations, size)
            self._case_cache_used += size
            while self._case_cache_used > self.case_cache_bytes:
                self._case_cache_used -= self._case_cache.popitem(last=False)[1][4]
        return data, seg, previous, class_locations

    def sample(self, case_id: str, force_fg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One cropped (not yet augmented) patch: data float32 (C, *box), seg int16 (1 or 2, *box)."""
        data, seg, previous, class_locations = self._load(case_id)
        lower = self.lower_corner(data.shape[1:], force_fg, class_locations)
        data_patch = crop_with_pad(data, lower, self.sampling_patch_size, DATA_PAD_VALUE, np.float32)
        seg_patch = crop_with_pad(seg, lower, self.sampling_patch_size, SEG_PAD_VALUE, np.int16)
        if previous is not None:
            previous_patch = crop_with_pad(previous, lower, self.sampling_patch_size, SEG_PAD_VALUE, np.int16)
            seg_patch = np.concatenate((seg_patch, previous_patch), axis=0)
        if self.is_2d:
            data_patch, seg_patch = data_patch[:, 0], seg_patch[:, 0]
        return torch.from_numpy(data_patch), torch.from_numpy(seg_patch)

    def generate_train_batch(self) -> dict[str, Any]:
        context = self._random_state.active() if self._random_state is not None else contextlib.nullcontext()
        with context, torch.no_grad():
            return self._batch()

    def _batch(self) -> dict[str, Any]:
        keys = [str(k) for k in self.get_indices()]
        data_all: torch.Tensor | None = None
        target_all: Any = None  # one tensor, or a list of them (one per deep-supervision scale)
        for j, case_id in enumerate(keys):
            image, seg = self.sample(case_id, self.force_foreground(j))
            if self.transforms is not None:
                out = self.transforms(image=image, segmentation=seg)
                image, seg = out["image"], out["segmentation"]
            if data_all is None:
                data_all = torch.empty((self.batch_size, *image.shape), dtype=torch.float32)
                if isinstance(seg, list):
                    target_all = [torch.empty((self.batch_size, *s.shape), dtype=s.dtype) for s in seg]
                else:
                    target_all = torch.empty((self.batch_size, *seg.shape), dtype=seg.dtype)
            data_all[j] = image
            if isinstance(seg, list):
                for level, s in enumerate(seg):
                    target_all[level][j] = s
            else:
                target_all[j] = seg
        return {"data": data_all, "target": target_all, "keys": keys}
