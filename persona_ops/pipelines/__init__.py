"""Pipeline stages: plain functions from declared input files to declared output files."""
