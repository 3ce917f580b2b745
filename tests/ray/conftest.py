"""The Ray tests: real `interlace serve --ray auto` servers, each starting its own local Ray
instance of 2 CPUs (`ray_helpers.RAY_AUTO`). Each module that needs Ray skips, with the
reason, only where Ray cannot be imported (`pip install -e '.[ray]'`; scripts/setup.sh
installs it); test_ray_options.py needs no Ray."""
