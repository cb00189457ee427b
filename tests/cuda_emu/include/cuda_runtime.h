// Host emulation stand-in (tests/cuda_emu): see emu.h.
#pragma once
#include "emu.h"
