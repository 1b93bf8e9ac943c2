"""``sandbox image ...``: the image store from the command line (exit 0, or 125 on error)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ImageError


def add_image_arguments(img: argparse.ArgumentParser) -> None:
    """Add the subcommands of ``sandbox image`` to its parser."""
    isub = img.add_subparsers(dest="image_command", required=True)
    isub.add_parser("ls", help="list tagged images")
    inspect = isub.add_parser("inspect", help="print an image's manifest, config and layers")
    inspect.add_argument("ref")
    rm = isub.add_parser("rm", help="remove tags (data goes at the next prune)")
    rm.add_argument("ref", nargs="+")
    isub.add_parser("prune", help="remove blobs and layers no tag reaches, and the build cache")
    tag = isub.add_parser("tag", help="give an image another name")
    tag.add_argument("source")
    tag.add_argument("target")
    build = isub.add_parser("build", help="build an image from a build file (Sandboxfile)")
    build.add_argument("-f", "--file", help="build file (default: CONTEXT/Sandboxfile)")
    build.add_argument("-t", "--tag", action="append", default=[], help="name the result")
    build.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    build.add_argument(
        "--run-profile", default="build", help="profile of RUN steps (default: build)"
    )
    build.add_argument(
        "--root-size",
        help="what one RUN step may write (default: the run profile's root_size, else 1G)",
    )
    build.add_argument("context", help="directory COPY reads from")
    save = isub.add_parser("save", help="write images as an OCI layout or a docker archive")
    save.add_argument("-o", "--output", required=True, help="directory, or FILE.tar")
    save.add_argument("--format", choices=("oci", "docker"), default="oci")
    save.add_argument("ref", nargs="+")
    load = isub.add_parser("load", help="read images from an OCI layout or a docker archive")
    load.add_argument("-i", "--input", required=True, help="layout directory or archive file")
    load.add_argument("-t", "--tag", help="name the loaded image (one image only)")
    pull = isub.add_parser("pull", help="pull HOST[:PORT]/NAME[:TAG|@DIGEST] from a registry")
    pull.add_argument("ref")
    push = isub.add_parser("push", help="push a stored image to HOST[:PORT]/NAME[:TAG]")
    push.add_argument("ref", help="the stored image")
    push.add_argument("target", nargs="?", help="where to push (default: the same name)")
    push.add_argument(
        "--format",
        choices=("oci", "docker"),
        default="oci",
        help="manifest to push: as stored (OCI), or Docker schema 2",
    )
    tags = isub.add_parser("tags", help="list a registry repository's tags")
    tags.add_argument("repository", help="HOST[:PORT]/NAME")


def _out(text: str) -> None:
    print(text, flush=True)


def run_image(args: argparse.Namespace) -> int:
    """Run one ``sandbox image`` subcommand."""
    from .image.store import Store, short

    store = Store()
    command = args.image_command
    if command == "ls":
        refs = store.refs()
        _out(f"{'NAME':<50} {'DIGEST':<14} {'LAYERS':>6} {'SIZE':>10}")
        for name, digest in sorted(refs.items()):
            try:
                image = store.image(digest)
            except ImageError:
                _out(f"{name:<50} {short(digest):<14} {'?':>6} {'damaged':>10}")
                continue
            size = sum(d.size for d in image.manifest.layers)
            _out(
                f"{name:<50} {short(digest):<14} {len(image.manifest.layers):>6} "
                f"{size / 1e6:>8.1f}MB"
            )
        return 0
    if command == "inspect":
        image = store.image(args.ref)
        doc = {
            "reference": args.ref,
            "digest": image.digest,
            "config_digest": image.config_digest,
            "media_type": image.manifest.media_type,
            "layers": [
                {
                    "digest": d.digest,
                    "size": d.size,
                    "diff_id": diff,
                    "path": str(store.layer_path(diff)),
                }
                for d, diff in zip(image.manifest.layers, image.config.diff_ids, strict=True)
            ],
            "config": image.config.to_json(),
            "tags": sorted(n for n, d in store.refs().items() if d == image.digest),
        }
        _out(json.dumps(doc, indent=2))
        return 0
    if command == "rm":
        for ref in args.ref:
            _out(f"untagged {store.untag(ref)}")
        return 0
    if command == "prune":
        blobs, layers, freed = store.prune()
        _out(f"removed {blobs} blobs and {layers} layers, {freed / 1e6:.1f} MB freed")
        return 0
    if command == "tag":
        image = store.image(args.source)
        _out(f"tagged {store.tag(args.target, image.digest)}")
        return 0
    if command == "build":
        from .image.build import DEFAULT_FILE, Builder
        from .supervisor import run_box
        from .units import parse_size

        for tag in args.tag:  # before the build, which may take minutes
            _check_tag(tag)
        try:
            root_size = parse_size(args.root_size) if args.root_size else None
        except ValueError as e:
            raise ImageError(f"--root-size: {e}") from None
        context = Path(args.context)
        buildfile = Path(args.file) if args.file else context / DEFAULT_FILE
        builder = Builder(
            store,
            lambda line: print(line, file=sys.stderr, flush=True),
            run_box,
            use_cache=not args.no_cache,
            run_profile=args.run_profile,
            root_size=root_size,
        )
        image = builder.build(buildfile, context, args.tag)
        _out(image.digest)
        return 0
    if command == "save":
        from .image.archive import save_docker, save_oci

        with store.using():
            images = [(str(_tag_name(ref)), store.image(ref)) for ref in args.ref]
            output = Path(args.output)
            if args.format == "docker":
                if output.suffix != ".tar":
                    raise ImageError("a docker archive is a tar file: name it FILE.tar")
                save_docker(images, store, output)
            else:
                save_oci(images, store, output)
        _out(f"saved {len(images)} image(s) to {output}")
        return 0
    if command == "load":
        from .image.archive import load

        if args.tag is not None:
            _check_tag(args.tag)
        for image, tags in load(Path(args.input), store, args.tag):
            _out(f"loaded {image.digest} {' '.join(tags)}".rstrip())
        return 0
    if command in ("pull", "push", "tags"):
        from .image import registry

        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        if command == "pull":
            _out(registry.pull(args.ref, store, progress).digest)
        elif command == "push":
            _out(
                registry.push(
                    args.ref, args.target or args.ref, store, progress, args.format == "docker"
                )
            )
        else:
            for tag in registry.list_tags(args.repository):
                _out(tag)
        return 0
    raise ImageError(f"unknown image command {command!r}")


def _tag_name(ref: str) -> str:
    """The name an image is saved under: the reference with ``latest`` filled in."""
    from .imageref import parse_reference

    if ref.startswith("sha256:"):
        return "image:" + ref.split(":", 1)[1][:12]
    parsed = parse_reference(ref)
    return str(parsed.with_tag()) if not parsed.digest else f"{parsed.name}:latest"


def _check_tag(tag: str) -> None:
    """Refuse a name the store could not tag with (``-t``), as ``Store.tag`` would."""
    from .imageref import parse_reference

    if parse_reference(tag).digest:
        raise ImageError(f"cannot tag with a digest reference {tag!r}", hint="-t NAME[:TAG]")
