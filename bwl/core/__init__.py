"""The ground floor: atomic writes, validated configs, content hashes and image grids. Imports no other bwl layer."""
