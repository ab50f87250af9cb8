"""A font with Chinese, Japanese and Korean glyphs for matplotlib, found on the system.

matplotlib's default font (DejaVu Sans) has no CJK glyphs: Chinese tokens would be drawn as
boxes with a "Glyph ... missing from font(s)" warning. `make install` installs Debian's
fonts-wqy-zenhei; any of the families below works. matplotlib's font cache may predate the
font's installation, so the font files are also looked for on disk and added to it.
"""

from __future__ import annotations

import logging
from functools import lru_cache

log = logging.getLogger(__name__)

#: Families with CJK glyphs, most preferred first.
CJK_FAMILIES = (
    "WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC",
    "Source Han Sans CN", "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN",
    "WenQuanYi Micro Hei",
)
# Lower-case pieces of the file names of those fonts, to find files the cache does not list.
_FILE_HINTS = ("wqy", "notosanscjk", "noto sans cjk", "notosanssc", "sourcehansans",
               "droidsansfallback", "uming", "ukai")
BASE_FAMILY = "DejaVu Sans"  # matplotlib's own; Latin, Greek, Cyrillic, arrows, ␣


@lru_cache(maxsize=1)
def cjk_family() -> str | None:
    """The name of an installed font family with CJK glyphs, or None (with a warning)."""
    from matplotlib import font_manager  # import time: matplotlib takes ~1.8 s (plots._pyplot)

    def known() -> str | None:
        names = {f.name for f in font_manager.fontManager.ttflist}
        return next((family for family in CJK_FAMILIES if family in names), None)

    family = known()
    if family is None:
        for path in font_manager.findSystemFonts():
            if any(hint in path.lower().replace("-", "") for hint in _FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError) as error:
                    log.debug("cannot read font %s: %s", path, error)
        family = known()
    if family is None:
        log.warning("no font with Chinese/Japanese/Korean glyphs found (looked for %s); CJK "
                    "tokens will show as boxes. On Debian: apt-get install fonts-wqy-zenhei",
                    ", ".join(CJK_FAMILIES[:3]))
    return family


def font_families() -> list[str]:
    """matplotlib's ``font.family`` list: the base font, then the CJK one for the glyphs the
    base font lacks (matplotlib falls back glyph by glyph along the list)."""
    family = cjk_family()
    return [BASE_FAMILY] + ([family] if family else [])
