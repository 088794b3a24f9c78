"""One reader and one writer per file format the project owns (issue 14, part 5).

Before this package an image was read five ways (one skipped the EXIF transpose), results.json
rows were built twice with different fields, the contact sheet had two writers with their
arguments in opposite order, and LoRA files were saved by the trainer, the tiny-model maker and
the tests each in its own way. Every writer here is atomic (portrait.core.io.atomic_path), and
every reader turns an unreadable file into one line naming it (exit 2).

- images:  `read_rgb` / `read_image` (EXIF transpose, RGB) and `write_image` (atomic PNG/JPEG/WebP)
- lora:    `write_safetensors` / `read_safetensors`, the trainer's per-component state
           (`read_lora_file`), diffusers and kohya LoRA files
- results: `results_row` (one results.json row), `read_results`
- sheet:   `write_contact_sheet` (one grid writer for prepare's and generate's sheets)

The identity bundle's writer and reader live in portrait.core.bundle.
"""
