"""What a parent node asks of its child, following QEMU's default permission rules."""

from __future__ import annotations

from .perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED, ChildRole


def child_permissions(role: ChildRole, perm: int, shared: int, *, writable: bool,
                      inactive: bool) -> tuple[int, int]:
    """(perm, shared) a parent with cumulative ``perm``/``shared`` needs on a child.

    ``writable`` is whether the parent may write (read-write and active); ``inactive``
    whether the parent is inactive, in which case it lets others write and resize.
    """
    if role & ChildRole.FILTERED:
        # Filters pass their parents' needs straight through.
        return perm & ALL, shared & ALL
    if role & ChildRole.COW:
        # Backing files are only ever read, and only consistently if the parent reads so.
        nperm = perm & CONSISTENT_READ
        nshared = (WRITE | RESIZE) if shared & WRITE else 0
        nshared |= CONSISTENT_READ | WRITE_UNCHANGED
    else:
        nperm = perm & ALL
        nshared = shared & ALL
        if role & ChildRole.METADATA:
            # Metadata may change even when the guest does not write, and no one else
            # may change it under us.
            if writable:
                nperm |= WRITE | RESIZE
            nperm |= CONSISTENT_READ
            nshared &= ~(WRITE | RESIZE)
        if role & ChildRole.DATA:
            nshared &= ~RESIZE
            if nperm & WRITE_UNCHANGED:
                nperm |= WRITE
            if nperm & WRITE:
                nperm |= RESIZE
    if inactive:
        nshared |= WRITE | RESIZE
    return nperm, nshared
