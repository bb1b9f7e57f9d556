"""Encoder builds (BERT family): their own load, export, quantize, package and quality stages; adapters and the manifest are shared with decoders."""
