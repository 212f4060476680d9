// librados and librbd (Debian: librados-dev, librbd-dev). They ship no pkg-config files, so the module
// map names the libraries itself. Only Sources/RBD/LibRBD.swift imports this module.
#include <rados/librados.h>
#include <rbd/librbd.h>
