"""The demo inside Glue: the Hubble Deep Field colour image, the source catalog detected
from it (``glue_vlm.demo.write_demo``), linked by pixel position, a scatter viewer to
select galaxies in, an image viewer with the catalog on top, and the panel open."""

from __future__ import annotations

from pathlib import Path

__all__ = ["demo_application"]


def demo_application(catalog_path: str | Path):
    """A ``GlueApplication`` set up on the demo catalog (not yet shown) and its panel.
    Call ``app.start()`` to hand control to the user."""
    from glue.core import Data
    from glue.core.link_helpers import LinkSame
    from glue_qt.app import GlueApplication
    from glue_qt.viewers.image import ImageViewer
    from glue_qt.viewers.scatter import ScatterViewer

    from ..demo import demo_image, pick_engine
    from .plugin import open_panel

    rgb = demo_image()
    image = Data(label="hubble-deep-field", red=rgb[..., 0], green=rgb[..., 1],
                 blue=rgb[..., 2])
    app = GlueApplication()
    catalog = app.load_data(str(catalog_path))
    app.data_collection.append(image)
    app.data_collection.add_link([LinkSame(catalog.id["x"], image.pixel_component_ids[1]),
                                  LinkSame(catalog.id["y"], image.pixel_component_ids[0])])

    scatter = app.new_data_viewer(ScatterViewer, data=catalog)
    scatter.state.x_att = catalog.id["half_light_radius"]
    scatter.state.y_att = catalog.id["surface_brightness"]
    viewer = app.new_data_viewer(ImageViewer, data=image)
    viewer.state.layers[0].attribute = image.id["green"]
    viewer.add_data(catalog)
    for layer in viewer.state.layers[1:]:
        layer.size = 3
    scatter.position, scatter.viewer_size = (0, 0), (520, 440)  # side by side
    viewer.position, viewer.viewer_size = (0, 445), (520, 440)
    panel = open_panel(app.session, app.data_collection)
    panel.state.catalog = catalog
    panel.state.task_preset = "galaxy-morphology"
    kind, model, note = pick_engine()
    panel.state.engine_kind = kind
    panel.state.model = model
    panel.show_status(note)
    return app, panel

