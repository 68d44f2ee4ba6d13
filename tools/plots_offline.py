"""DVC plots that draw without a network (DVC's own page loads its libraries from a CDN): an HTML template with Vega
inlined, and PNG images of the plots, from the pinned vl-convert-python (docs/model-registry.md#plots-offline).
Run: python -m tools.plots_offline template   (writes .dvc/plots/offline.html, DVC's html_template in .dvc/config)
     python -m tools.plots_offline png [REV...] [--out dvc_plots/png]   (one PNG per plot of `dvc plots diff REV...`)"""

import argparse
import importlib.metadata
import json
import re
import subprocess
from pathlib import Path

import vl_convert

from medgemma_breakhis.core.files import atomic_write_text

# The Vega-Lite major version of DVC's plot templates ($schema .../vega-lite/v5.json).
VEGA_LITE = "5.21"
TEMPLATE = Path(".dvc/plots/offline.html")
# DVC fills {refresh_tag} and {plot_divs}; the template has no {scripts}, where DVC would put its CDN <script> tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC plots</title>
    <!-- Vega {vega}, Vega-Lite {vega_lite}, vega-embed {vega_embed}, inlined from vl-convert-python {vl_convert}
         by `python -m tools.plots_offline template`: this page loads nothing from the network. -->
    <script>
{bundle}
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def offline_template() -> str:
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if re.search(r"</script", bundle, re.IGNORECASE) or re.search(r"\{(scripts|plot_divs|refresh_tag)\}", bundle):
        raise ValueError("the Vega bundle holds text that would end the inline <script> or that DVC would replace")
    return PAGE.format(
        bundle=bundle,
        vega=vl_convert.get_vega_version(),
        vega_lite=VEGA_LITE,
        vega_embed=vl_convert.get_vega_embed_version(),
        vl_convert=importlib.metadata.version("vl-convert-python"),
    )


def plot_specs(revisions: list[str]) -> dict[str, dict]:
    """The Vega-Lite spec, data included, of each plot of `dvc plots diff <revisions>`, by plot id."""
    shown = subprocess.run(["dvc", "plots", "diff", *revisions, "--json"], capture_output=True, text=True, check=True)
    return {
        plot_id: rendered[0]["content"]
        for plot_id, rendered in json.loads(shown.stdout)["data"].items()
        if rendered and rendered[0]["type"] == "vega"
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("template", help=f"write {TEMPLATE}")
    images = commands.add_parser("png", help="one PNG per plot, as `dvc plots diff REV...` draws it")
    images.add_argument("revisions", nargs="*", help="as for `dvc plots diff` (none: HEAD against the workspace)")
    images.add_argument("--out", type=Path, default=Path("dvc_plots/png"))
    args = parser.parse_args(argv)
    if args.command == "template":
        atomic_write_text(TEMPLATE, offline_template())
        print(f"wrote {TEMPLATE}")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for plot_id, spec in plot_specs(args.revisions).items():
            path = args.out / f"{plot_id}.png"
            path.write_bytes(vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, scale=2))
            print(path)


if __name__ == "__main__":
    main()
