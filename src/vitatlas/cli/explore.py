"""``vitatlas explore``: the explorer web app on runs and a store (or a static export of it)."""

from __future__ import annotations

import click


@click.command("explore")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--acts", required=True, type=click.Path(), help="Activation store the runs were fitted on.")
@click.option("--cards", multiple=True, type=click.Path(),
              help="Atom cards of each run (from `vitatlas interpret`), one per run in order; made once and "
                   "cached when left out.")
@click.option("--model", default=None, help="Model for live interventions, e.g. embedded:dinov2-s.")
@click.option("--probe", default=None, type=click.Path(), help="Probe (from `vitatlas probe train`) to read "
              "predictions before and after an edit; needs --model.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep 127.0.0.1 unless "
              "others must reach it).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--open", "open_browser", is_flag=True, help="Open the explorer in the default browser.")
@click.option("--export", "export_dir", default=None, type=click.Path(),
              help="Write a static site (everything but the live intervention) to this folder and exit.")
@click.option("--export-images", default=500, show_default=True, type=click.IntRange(0),
              help="Static export: image pages for at most this many images (those in the most top lists).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def explore(runs, acts, cards, model, probe, host, port, open_browser, export_dir, export_images, device, no_progress):
    """Browse atoms, click patches and edit atoms live in the browser.

    \b
    vitatlas explore runs/ksvd runs/sae --acts acts/patches --cards cards/ksvd --cards cards/sae
    vitatlas explore runs/ksvd --acts acts/patches --model embedded:dinov2-s --probe probe
    vitatlas explore runs/ksvd --acts acts/patches --export site     # static site, no server
    """
    from ..explore import Explorer

    if export_dir is not None and (model or probe):
        click.echo("note: --model/--probe are not used by --export (a static site has no live intervention)")
        model = probe = None
    explorer = Explorer.open(list(runs), acts, cards=list(cards) or None, model=model, probe=probe,
                             device=device, progress=not no_progress)
    if export_dir is not None:
        from ..explore import export_site

        index = export_site(explorer, export_dir, max_images=export_images, progress=not no_progress)
        click.echo(f"static explorer written: open {index}")
        return
    from ..explore import serve

    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    click.echo(f"vitatlas explorer on {url}  (Ctrl-C to stop)")
    if explorer.live is None:
        click.echo("live intervention is off: add --model (and --probe) to edit atoms from the image page")
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    serve(explorer, host, port)
