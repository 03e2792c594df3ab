"""QuPath projects through paquo: export training data, batch-segment, import GeoJSON.

The logic is plain Python on plain data (:mod:`.entries`, :mod:`.regions`,
:mod:`.export`, :mod:`.batch`, :mod:`.ledger`, :mod:`.import_geojson`) so it is
tested without QuPath; :mod:`.project` is the thin paquo adapter and the only
module that needs a QuPath installation (``PAQUO_QUPATH_DIR``). Importing this
package never starts QuPath.
"""

from __future__ import annotations

from dannucnet.qupath.entries import ImageEntryData, ObjectData

__all__ = ["ImageEntryData", "ObjectData"]
