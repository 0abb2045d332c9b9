/* config.c - placeholder until the module lands */
#include "outboxd/util.h"
