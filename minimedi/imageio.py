"""Writing results a person looks at: PNG grids of images, NIfTI stacks for radiology viewers, and the
report's pictures (a before/after pair of grids, a bar chart), drawn with Pillow alone.

All write to a temporary file and rename it into place, so an interrupted run never leaves a torn file.
"""
import nibabel as nib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from minimedi.atomic import atomic_path
from minimedi.errors import UserError


def to_uint8(images):
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] in [0, 255]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images, nrow=8, pad=2):
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 array [rows*(H+pad)+pad, nrow*(W+pad)+pad, C]."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def save_grid(images, path, nrow=8, scale=1):
    """Write a PNG grid of [N, C, H, W] images in [-1, 1]; `scale` enlarges small images (nearest)."""
    grid = make_grid(images, nrow)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def save_nifti(images, path, spacing_mm=1.0):
    """Write [N, 1, H, W] slices as one NIfTI volume (x, y, z) = (W, H, N).

    The affine is a plain RAS+ grid of `spacing_mm` voxels centred on the origin: image columns run
    along x, rows (top to bottom) along -y, and the N slices along z, so viewers show each slice
    upright. Intensities stay in [-1, 1] as float32.
    """
    volume = images.detach().float().cpu()[:, 0].numpy()  # [N, H, W]
    n, h, w = volume.shape
    data = np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1, :])  # [W, H, N], y up
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -0.5 * spacing_mm * (np.array([w, h, n]) - 1)
    with atomic_path(path, suffix=".nii.gz" if str(path).endswith(".gz") else ".nii") as tmp:  # nibabel reads it
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), tmp)


# ---- the report's pictures -----------------------------------------------------------------------------

CHART_SIZE = (640, 400)
# Plot area margins (left, top, right, bottom): tick labels and the rotated y label on the left, the
# title on top, the reference line's label on the right, bar labels below.
CHART_MARGINS = (80, 50, 110, 50)
BAR_COLORS = ((76, 114, 176), (221, 132, 82), (85, 168, 104), (129, 114, 179), (147, 120, 96), (100, 100, 100))
REFERENCE_COLOR = (192, 0, 0)
GRID_COLOR = (225, 225, 225)


def load_font(size):
    """Pillow's built-in font at `size` px; Pillow before 10.1 only has a small fixed-size bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def put_text(draw, xy, text, font, anchor="mt", fill="black", background=None):
    """Draw `text` with the point of its box named by `anchor` at xy (horizontal l/m/r, vertical t/m/b),
    on a `background` patch if given.

    Placed by measuring the text: Pillow's own `anchor` is ignored by bitmap fonts (the pre-10.1 default)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = round(xy[0] - {"l": 0, "m": (right - left) / 2, "r": right - left}[anchor[0]])
    y = round(xy[1] - {"t": 0, "m": (bottom - top) / 2, "b": bottom - top}[anchor[1]])
    if background is not None:
        draw.rectangle([x - 2, y - 1, x + right - left + 1, y + bottom - top], fill=background)
    draw.text((x - left, y - top), text, font=font, fill=fill)


def put_vertical_text(picture, center, text, font):
    """Text running bottom to top (a y-axis label), centred at `center`."""
    left, top, right, bottom = ImageDraw.Draw(picture).textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (right - left + 2, bottom - top + 2), "white")
    ImageDraw.Draw(label).text((1 - left, 1 - top), text, font=font, fill="black")
    label = label.rotate(90, expand=True)
    picture.paste(label, (center[0] - label.width // 2, center[1] - label.height // 2))


def bar_chart(title, labels, series, reference=None, ylabel="female fraction", ymax=1.0, size=CHART_SIZE):
    """A bar chart as a PIL image of `size`: one group of bars per label in `labels`, one bar per series.

    series = [(name, values, intervals)]: values [G], intervals [G] of (low, high) drawn as whiskers, or
    None. One series: a colour per bar and its value printed above it; several: a colour per series and a
    legend. `reference` = (label, value) is drawn as a dashed horizontal line across the plot (the target
    share), labelled on the right. The y axis runs from 0 to `ymax` with ticks at quarters; values outside
    are drawn clipped to the axis (and printed as they are).
    """
    width, height = size
    left, top, right, bottom = (CHART_MARGINS[0], CHART_MARGINS[1], width - CHART_MARGINS[2],
                                height - CHART_MARGINS[3])
    small, large = load_font(14), load_font(18)
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)

    def row(value):
        return bottom - round(min(max(value, 0.0), ymax) / ymax * (bottom - top))

    put_text(draw, (width / 2, 14), title, large)
    put_vertical_text(picture, (16, (top + bottom) // 2), ylabel, small)
    for k in range(5):
        y = row(ymax * k / 4)
        draw.line([(left, y), (right, y)], fill=GRID_COLOR)
        draw.line([(left - 5, y), (left, y)], fill="black")
        put_text(draw, (left - 8, y), f"{ymax * k / 4:g}", small, anchor="rm")
    slot, k = (right - left) / len(labels), len(series)
    bars = []  # (x0, x1, value, interval, colour)
    for j, (_, values, intervals) in enumerate(series):
        for i, value in enumerate(values):
            x0 = left + slot * (i + 0.1 + 0.8 * j / k) + (0.1 * slot if k == 1 else 0)
            x1 = left + slot * (i + 0.1 + 0.8 * (j + 1) / k) - (0.1 * slot if k == 1 else 1)
            colour = BAR_COLORS[(i if k == 1 else j) % len(BAR_COLORS)]
            bars.append((round(x0), round(x1), value, intervals[i] if intervals else None, colour))
    for x0, x1, value, _, colour in bars:
        if value is not None and row(value) < bottom:
            draw.rectangle([x0, row(value), x1, bottom - 1], fill=colour)
    draw.line([(left, top), (left, bottom)], fill="black")
    draw.line([(left, bottom), (right, bottom)], fill="black")
    for x0, x1, _, interval, _ in bars:
        if interval is not None:
            x, (low, high) = (x0 + x1) // 2, interval
            draw.line([(x, row(low)), (x, row(high))], fill="black")
            for y in (row(low), row(high)):
                draw.line([(x - 3, y), (x + 3, y)], fill="black")
    if reference is not None:
        label, value = reference
        y = row(value)
        for x in range(left, right, 12):  # dashes 8 px long, 4 px apart
            draw.line([(x, y), (min(x + 8, right), y)], fill=REFERENCE_COLOR, width=2)
        put_text(draw, (right + 6, y), f"{label}\n{value:.2f}", small, anchor="lm", fill=REFERENCE_COLOR)
    if k == 1:
        for x0, x1, value, interval, _ in bars:
            # Above the bar and its whisker, on a white patch: legible where it meets the reference line.
            above = value if interval is None else max(value, interval[1])
            put_text(draw, ((x0 + x1) / 2, row(above) - 4), f"{value:.2f}", small, anchor="mb", background="white")
    else:
        x = left + 8
        for j, (name, _, _) in enumerate(series):
            draw.rectangle([x, top + 4, x + 12, top + 16], fill=BAR_COLORS[j % len(BAR_COLORS)])
            put_text(draw, (x + 16, top + 10), name, small, anchor="lm", background="white")
            x += 28 + draw.textbbox((0, 0), name, font=small)[2]
    crowded = any(draw.textbbox((0, 0), label, font=small)[2] > 0.95 * slot for label in labels)
    for i, label in enumerate(labels):  # when labels are wider than their slot, every other one goes lower
        put_text(draw, (left + slot * (i + 0.5), bottom + 6 + (18 if crowded and i % 2 else 0)), label, small)
    return picture


def save_bar_chart(path, title, bars, reference=None, ylabel="female fraction", ymax=1.0):
    """Write a PNG bar chart (CHART_SIZE) of `bars` = [(label, value)], a colour per bar, the value above
    each bar (`bar_chart`)."""
    save_panels(path, [bar_chart(title, [label for label, _ in bars], [("", [v for _, v in bars], None)],
                                 reference, ylabel, ymax)])


def save_panels(path, pictures):
    """Write PIL images stacked top to bottom (left-aligned, on white) as one PNG."""
    canvas = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    y = 0
    for picture in pictures:
        canvas.paste(picture, (0, y))
        y += picture.height
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def save_side_by_side(left, right, path, titles=("before", "after"), nrow=8, scale=2):
    """Write two grids of [N, C, H, W] images in [-1, 1] side by side, each under its title.

    Both sets must have the same shape, so the two grids line up image for image."""
    if left.shape != right.shape:
        raise UserError(f"side-by-side grids need image sets of the same shape, got {tuple(left.shape)} "
                        f"and {tuple(right.shape)}")
    panels = []
    for images in (left, right):
        grid = make_grid(images, nrow)
        panel = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).convert("RGB")
        panels.append(panel.resize((panel.width * scale, panel.height * scale), Image.NEAREST))
    font = load_font(16)
    band, gap = 30, 16  # title band height, space between the grids
    picture = Image.new("RGB", (2 * panels[0].width + gap, band + panels[0].height), "white")
    draw = ImageDraw.Draw(picture)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        x = i * (panel.width + gap)
        picture.paste(panel, (x, band))
        put_text(draw, (x + panel.width / 2, band / 2), title, font, anchor="mm")
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
