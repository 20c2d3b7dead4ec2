import sys


def stop_image_server() -> None:
    """Stop this process's image server, if it ever started one, before leaving with os._exit
    (which runs no exit handler): its socket directory would be left behind."""
    images = sys.modules.get("activities.transport.imageserver")
    if images is not None:
        images.SERVER.stop()
