"""The bpf(2) system call, for what the eBPF mode does once its programs are loaded: open pinned
maps and programs, read and write map entries (one at a time and in batches), pin, attach to and
detach from a cgroup. ctypes over libc, no bcc: importing bcc maps its LLVM and costs about 65 MB
of resident memory before anything is compiled, so only the short-lived compiler process does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterable

SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}.get(platform.machine(), 321)
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_PIN, OBJ_GET, PROG_ATTACH, PROG_DETACH = 6, 7, 8, 9
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH, MAP_UPDATE_BATCH = 24, 26
ENOTSUPP = 524  # the kernel's "operation not supported" (not in errno): a map type without batch ops
NO_BATCH = (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Elem(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _Batch(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _Obj(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _Attach(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


def _call(cmd: int, attr: ctypes.Structure, what: str) -> int:
    r = int(_libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf {what}: {os.strerror(err) if err != ENOTSUPP else 'not supported'}")
    return r


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_get(path: str) -> int:
    """A new file descriptor for the program or map pinned at `path`."""
    p = ctypes.create_string_buffer(path.encode())
    return _call(OBJ_GET, _Obj(pathname=ctypes.addressof(p)), f"get {path}")


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    _call(OBJ_PIN, _Obj(pathname=ctypes.addressof(p), bpf_fd=fd), f"pin {path}")


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
    _call(PROG_ATTACH, _Attach(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type,
                               attach_flags=flags), f"attach type {attach_type}")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    _call(PROG_DETACH, _Attach(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type),
          f"detach type {attach_type}")


class Map:
    """A pinned BPF map, opened by path; keys and values as bytes of the map's sizes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = obj_get(path)
        info = _MapInfo()
        _call(OBJ_GET_INFO_BY_FD, _Info(bpf_fd=self.fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
              f"info of {path}")
        self.key_size, self.value_size = int(info.key_size), int(info.value_size)
        self._batch_update = self._batch_lookup = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _elem(self, cmd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None, what: str) -> None:
        k = ctypes.create_string_buffer(key, self.key_size)
        _call(cmd, _Elem(map_fd=self.fd, key=ctypes.addressof(k), value=_addr(value)), f"{what} in {self.path}")

    def lookup(self, key: bytes) -> bytes | None:
        v = ctypes.create_string_buffer(self.value_size)
        try:
            self._elem(MAP_LOOKUP_ELEM, key, v, "lookup")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def update(self, key: bytes, value: bytes) -> None:
        self._elem(MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, self.value_size), "update")

    def delete(self, key: bytes) -> bool:
        """False when the key was not there."""
        try:
            self._elem(MAP_DELETE_ELEM, key, None, "delete")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def update_many(self, items: list[tuple[bytes, bytes]]) -> None:
        """Every (key, value), in order: one BPF_MAP_UPDATE_BATCH call where the map type has it
        (hash maps), else one update each (LPM tries)."""
        if not items:
            return
        if self._batch_update and len(items) > 1:
            keys = ctypes.create_string_buffer(b"".join(k for k, _ in items), self.key_size * len(items))
            vals = ctypes.create_string_buffer(b"".join(v for _, v in items), self.value_size * len(items))
            attr = _Batch(keys=ctypes.addressof(keys), values=ctypes.addressof(vals), count=len(items), map_fd=self.fd)
            try:
                _call(MAP_UPDATE_BATCH, attr, f"update batch in {self.path}")
                return
            except OSError as exc:
                if exc.errno not in NO_BATCH:
                    raise
                self._batch_update = False  # and every entry written singly (again: updates are idempotent)
        for k, v in items:
            self.update(k, v)

    def delete_many(self, keys: Iterable[bytes]) -> int:
        return sum(self.delete(k) for k in keys)

    def keys(self) -> list[bytes]:
        """Every key, by BPF_MAP_GET_NEXT_KEY."""
        out: list[bytes] = []
        cur = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        first = True
        while True:
            attr = _Elem(map_fd=self.fd, key=0 if first else ctypes.addressof(cur), value=ctypes.addressof(nxt))
            try:
                _call(MAP_GET_NEXT_KEY, attr, f"next key in {self.path}")
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt.raw)
            ctypes.memmove(cur, nxt, self.key_size)
            first = False

    def dump(self, chunk: int = 4096) -> dict[bytes, bytes]:
        """Every entry, `chunk` per BPF_MAP_LOOKUP_BATCH call (a few system calls for the whole
        map, in bounded memory); key by key where the map type has no batch lookup (LPM tries)."""
        out: dict[bytes, bytes] = {}
        if self._batch_lookup:
            keys = ctypes.create_string_buffer(self.key_size * chunk)
            vals = ctypes.create_string_buffer(self.value_size * chunk)
            token_in, token_out = ctypes.c_uint64(0), ctypes.c_uint64(0)  # opaque positions (hash maps: a bucket)
            first = True
            while True:
                attr = _Batch(in_batch=0 if first else ctypes.addressof(token_in),
                              out_batch=ctypes.addressof(token_out), keys=ctypes.addressof(keys),
                              values=ctypes.addressof(vals), count=chunk, map_fd=self.fd)
                done = False
                try:
                    _call(MAP_LOOKUP_BATCH, attr, f"lookup batch in {self.path}")
                except OSError as exc:
                    if first and exc.errno in NO_BATCH:
                        self._batch_lookup = False
                        break
                    if exc.errno != errno.ENOENT:
                        raise
                    done = True  # that was the last of them
                kraw, vraw = keys.raw, vals.raw
                ks, vs = self.key_size, self.value_size
                for i in range(attr.count):
                    out[kraw[i * ks:(i + 1) * ks]] = vraw[i * vs:(i + 1) * vs]
                if done:
                    return out
                token_in.value = token_out.value
                first = False
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                out[k] = v
        return out
