/* decoder.c: placeholder, being written */
#include "wp_setup.h"
