"""What a parent node asks of its child, following QEMU's default permission rules."""

from __future__ import annotations

from .perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED, ChildRole

_FILTERED = ChildRole.FILTERED._value_
_COW = ChildRole.COW._value_
_METADATA = ChildRole.METADATA._value_
_DATA = ChildRole.DATA._value_


def child_permissions(role: ChildRole, perm: int, shared: int, *, writable: bool,
                      inactive: bool) -> tuple[int, int]:
    """(perm, shared) a parent with cumulative ``perm``/``shared`` needs on a child.

    ``writable`` is whether the parent may write (read-write and active); ``inactive``
    whether the parent is inactive, in which case it lets others write and resize.
    """
    # Plain int tests: Flag operators build a new member each time, and this runs for
    # every edge of every permission update.
    bits = role._value_
    if bits & _FILTERED:
        # Filters pass their parents' needs straight through.
        return perm & ALL, shared & ALL
    if bits & _COW:
        # Backing files are only ever read, and only consistently if the parent reads so.
        nperm = perm & CONSISTENT_READ
        nshared = (WRITE | RESIZE) if shared & WRITE else 0
        nshared |= CONSISTENT_READ | WRITE_UNCHANGED
    else:
        nperm = perm & ALL
        nshared = shared & ALL
        if bits & _METADATA:
            # Metadata may change even when the guest does not write, and no one else
            # may change it under us.
            if writable:
                nperm |= WRITE | RESIZE
            nperm |= CONSISTENT_READ
            nshared &= ~(WRITE | RESIZE)
        if bits & _DATA:
            nshared &= ~RESIZE
            if nperm & WRITE_UNCHANGED:
                nperm |= WRITE
            if nperm & WRITE:
                nperm |= RESIZE
    if inactive:
        nshared |= WRITE | RESIZE
    return nperm, nshared
