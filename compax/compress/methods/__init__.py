"""The compression methods, one module each, registered as recipe steps (`compax.compress.registry`)."""
