"""The UTS namespace: the box's host name (uts_namespaces(7)). The supervisor picks the name
(:func:`hostname`); the box's init sets it in its new namespace."""

from __future__ import annotations

from ..kernel import KernelOps
from ..spec import Spec
from .plan import ChildPlan


def hostname(spec: Spec) -> str:
    """The request's host name, else the profile's."""
    return spec.hostname or spec.profile.hostname


def child_set_hostname(k: KernelOps, plan: ChildPlan) -> None:
    k.sethostname(plan.hostname)
