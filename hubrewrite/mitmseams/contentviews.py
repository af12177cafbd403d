"""Removing a content view the mirror added with ``contentviews.add``.

Relies on: the registry's private name table (``contentviews.registry._by_name``,
lower-case view name -> view) and its ``on_change`` signal, which mitmweb listens to.
Why: mitmproxy 12 has no public call to remove a view (``contentviews.remove`` is a
deprecated no-op), and the addon's views must go when it is unloaded.
"""

from __future__ import annotations

from mitmproxy import contentviews


def remove_view(view: contentviews.Contentview) -> None:
    """Remove ``view`` if it is still the one registered under its name (never a view that replaced it)."""
    registry = contentviews.registry
    key = view.name.lower()
    if registry.get(key) is view:
        del registry._by_name[key]
        registry.on_change.send(view)
