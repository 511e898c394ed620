"""report.html: one self-contained page of an evaluation, for a reader with a browser and no network.

It is report.md rendered to HTML (Python-Markdown with its `tables` extension, the same text, so the two never
drift), with every figure the page names (roc.png, pr.png, calibration.png, subgroups.png, gallery.png) embedded
as a base64 `data:` URI, and a small inline stylesheet sized for a laptop screen. It references nothing outside
itself: no script, no font, no stylesheet, no image file.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from manifests.atomic import write_bytes_atomic

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1b1f24;
margin:0 auto;padding:1.2rem 1.6rem 3rem;max-width:1180px;background:#fff}
h1{font-size:1.45rem;margin:.2rem 0 .8rem;border-bottom:2px solid #d0d7de;padding-bottom:.4rem}
h2{font-size:1.15rem;margin:1.8rem 0 .6rem;border-bottom:1px solid #d0d7de;padding-bottom:.25rem}
h3{font-size:1rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;margin:.4rem 0 1rem;font-size:13px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f5f7}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
img{max-width:100%;height:auto;border:1px solid #e1e4e8;margin:.3rem 0}
blockquote{margin:.6rem 0;padding:.4rem .9rem;background:#fff8e1;border-left:4px solid #f0b400}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f5f7;padding:0 3px}
"""
_IMAGE = re.compile(r'<img alt="([^"]*)" src="([^"]+)"\s*/?>')


def render_html(markdown_text: str, out_dir: str | Path, title: str) -> str:
    """The page for `markdown_text` (report.md), its images read from `out_dir` and embedded."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    out_dir = Path(out_dir)

    def embed(match: re.Match) -> str:
        alt, src = match.group(1), match.group(2)
        path = out_dir / src
        if "/" in src or not path.is_file():   # only figures written beside the report, never another file
            return f"<p><em>{html.escape(alt)}: not drawn</em></p>"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{alt}" src="data:image/png;base64,{data}">'

    body = _IMAGE.sub(embed, body)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_html(markdown_text: str, out_dir: str | Path, title: str) -> Path:
    """Write `out_dir/report.html` (atomically) and return its path."""
    path = Path(out_dir) / "report.html"
    write_bytes_atomic(path, render_html(markdown_text, out_dir, title).encode())
    return path
