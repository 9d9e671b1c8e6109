"""Minimal NIfTI-1 single-file reader/writer in numpy (no nibabel, which Slicer does not bundle).

Used to hand volumes to the ``ftddm`` command line and to read its outputs with exactly the affine it wrote
(the sform when set, else the qform), independently of ITK's sform/qform preferences. Data are (i, j, k[, c])
in Fortran order on disk, the affine is voxel → RAS in mm (NIfTI-1 standard, §"Method 2/3" of nifti1.h).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

HEADER_SIZE = 348
DATA_OFFSET = 352  # header + 4-byte extension flag
_CODES = {  # NIfTI datatype code ↔ numpy dtype
    2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64,
    256: np.int8, 512: np.uint16, 768: np.uint32, 1024: np.int64, 1280: np.uint64,
}
_DTYPE_CODE = {np.dtype(t): c for c, t in _CODES.items()}
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _check_suffix(path: Path) -> bool:
    """True for .nii.gz (compressed), False for .nii; ValueError otherwise."""
    name = path.name.lower()
    if not name.endswith(_NIFTI_SUFFIXES):
        raise ValueError(f"{path}: expected a NIfTI file name ending in .nii or .nii.gz")
    return name.endswith(".gz")


# ------------------------------------------------------------------------------------ quaternions
def _quaternion_from_rotation(r: np.ndarray) -> np.ndarray:
    """Unit quaternion (a, b, c, d) with a ≥ 0 of a proper rotation matrix (Shepperd's method)."""
    t = np.trace(r)
    if t > 0:
        s = 2 * np.sqrt(t + 1)
        q = (s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s)
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2 * np.sqrt(1 + r[0, 0] - r[1, 1] - r[2, 2])
        q = ((r[2, 1] - r[1, 2]) / s, s / 4, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s)
    elif r[1, 1] > r[2, 2]:
        s = 2 * np.sqrt(1 + r[1, 1] - r[0, 0] - r[2, 2])
        q = ((r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, s / 4, (r[1, 2] + r[2, 1]) / s)
    else:
        s = 2 * np.sqrt(1 + r[2, 2] - r[0, 0] - r[1, 1])
        q = ((r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, s / 4)
    q = np.asarray(q, dtype=np.float64)
    return -q if q[0] < 0 else q


def _rotation_from_quaternion(b: float, c: float, d: float) -> np.ndarray:
    """Rotation matrix of the NIfTI quaternion (b, c, d), a = sqrt(1 − b² − c² − d²) (nifti1.h, method 2)."""
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c],
    ])


def qform_parameters(affine: np.ndarray):
    """(quatern b, c, d, qfac, zooms) of an affine whose 3×3 part is a rotation times a diagonal, else None."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.linalg.norm(m, axis=0)
    r = m / zooms
    if not np.allclose(r.T @ r, np.eye(3), atol=1e-6):
        return None  # sheared: a qform cannot represent it, readers must use the sform
    qfac = 1.0
    if np.linalg.det(r) < 0:  # left-handed voxel axes: NIfTI flips k through qfac = pixdim[0] = −1
        qfac = -1.0
        r[:, 2] = -r[:, 2]
    u, _, vt = np.linalg.svd(r)  # nearest exact rotation (removes float round-off)
    q = _quaternion_from_rotation(u @ vt)
    return q[1], q[2], q[3], qfac, zooms


# ----------------------------------------------------------------------------------------- writing
def _header(shape: tuple, dtype: np.dtype, affine: np.ndarray) -> bytes:
    h = bytearray(DATA_OFFSET)
    struct.pack_into("<i", h, 0, HEADER_SIZE)
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    struct.pack_into("<8h", h, 40, *dims)
    struct.pack_into("<hh", h, 70, _DTYPE_CODE[dtype], dtype.itemsize * 8)
    q = qform_parameters(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    qfac = q[3] if q is not None else (1.0 if np.linalg.det(affine[:3, :3]) > 0 else -1.0)
    struct.pack_into("<8f", h, 76, qfac, *zooms, *([1.0] * 4))
    struct.pack_into("<fff", h, 108, float(DATA_OFFSET), 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    h[123] = 2 | 8  # xyzt_units: mm, s
    h[148:148 + 21] = b"MRSISuperResolution\x00\x00"
    struct.pack_into("<hh", h, 252, 1 if q is not None else 0, 1)  # qform_code, sform_code (scanner)
    if q is not None:
        struct.pack_into("<6f", h, 256, q[0], q[1], q[2], *affine[:3, 3])
    struct.pack_into("<12f", h, 280, *np.asarray(affine[:3, :4], dtype=np.float64).ravel())
    h[344:348] = b"n+1\x00"
    return bytes(h)


def write_nifti(path, data: np.ndarray, affine) -> Path:
    """Write (i, j, k[, c]) data with a voxel → RAS affine (sform, and qform when it has no shear), atomically
    (ftddm_core.atomic.atomic_write: the umask's file mode, never a half-written file).

    .nii.gz files are written reproducibly (gzip mtime 0, no embedded name).
    """
    path = Path(path)
    compressed = _check_suffix(path)
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"{path}: expected 3D (i, j, k) or 4D (i, j, k, c) data, got shape {data.shape}")
    if data.dtype == bool:
        data = data.astype(np.uint8)
    dtype = data.dtype.newbyteorder("<") if data.dtype.byteorder == ">" else data.dtype
    if np.dtype(dtype.name) not in _DTYPE_CODE:
        raise ValueError(f"{path}: unsupported data type {data.dtype}; expected one of "
                         f"{sorted(np.dtype(t).name for t in _CODES.values())}")
    dtype = np.dtype(dtype.name).newbyteorder("<")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{path}: expected a finite 4×4 affine, got {affine.shape}")
    payload = _header(data.shape, np.dtype(dtype.name), affine) + np.asarray(data, dtype=dtype).tobytes(order="F")
    # Imported here, not with the module: the engine folder joins sys.path only after the Lib has loaded
    # (MRSISuperResolution._makeEngineImportable); ftddm_core.atomic needs nothing beyond the standard library.
    from ftddm_core.atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as raw:
            if compressed:
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                    gz.write(payload)
            else:
                raw.write(payload)

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------- reading
def _affine_from_header(h: bytes, endian: str) -> np.ndarray:
    qform_code, sform_code = struct.unpack_from(endian + "hh", h, 252)
    pixdim = struct.unpack_from(endian + "8f", h, 76)
    affine = np.eye(4)
    if sform_code > 0:
        affine[:3, :4] = np.asarray(struct.unpack_from(endian + "12f", h, 280)).reshape(3, 4)
    elif qform_code > 0:
        b, c, d, x, y, z = struct.unpack_from(endian + "6f", h, 256)
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        zooms = np.array([pixdim[1], pixdim[2], pixdim[3] * qfac])
        affine[:3, :3] = _rotation_from_quaternion(b, c, d) * zooms
        affine[:3, 3] = (x, y, z)
    else:  # "method 1" (analyze): voxel sizes only
        affine[:3, :3] = np.diag(pixdim[1:4])
    return affine


def read_nifti(path) -> tuple[np.ndarray, np.ndarray]:
    """(data (i, j, k[, c]), voxel → RAS affine) of a NIfTI-1 file; scaled data (scl_slope) come back float32."""
    path = Path(path)
    compressed = _check_suffix(path)
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable NIfTI file ({err})") from err
    if len(raw) < HEADER_SIZE:
        raise ValueError(f"{path}: too short for a NIfTI-1 header ({len(raw)} bytes)")
    endian = "<" if struct.unpack_from("<i", raw, 0)[0] == HEADER_SIZE else ">"
    if struct.unpack_from(endian + "i", raw, 0)[0] != HEADER_SIZE or raw[344:347] != b"n+1":
        raise ValueError(f"{path}: not a single-file NIfTI-1 image (expected sizeof_hdr 348 and magic 'n+1')")
    dims = struct.unpack_from(endian + "8h", raw, 40)
    ndim = dims[0]
    shape = tuple(int(n) for n in dims[1:1 + ndim])
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    if len(shape) > 4:
        raise ValueError(f"{path}: {len(shape)}D image; expected 3D (i, j, k) or 4D (i, j, k, c)")
    code = struct.unpack_from(endian + "h", raw, 70)[0]
    if code not in _CODES:
        raise ValueError(f"{path}: unsupported NIfTI datatype code {code}")
    dtype = np.dtype(_CODES[code]).newbyteorder(endian)
    offset = int(struct.unpack_from(endian + "f", raw, 108)[0])
    count = int(np.prod(shape))
    if len(raw) < offset + count * dtype.itemsize:
        raise ValueError(f"{path}: truncated data ({len(raw) - offset} bytes for {count} voxels of {dtype.name})")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    data = data.astype(dtype.newbyteorder("="))
    slope, inter = struct.unpack_from(endian + "ff", raw, 112)
    if np.isfinite(slope) and slope != 0 and (slope != 1 or inter != 0):
        data = (data * np.float32(slope) + np.float32(inter)).astype(np.float32)
    return data, _affine_from_header(raw, endian)
