// See gloo/context.h: ProcessGroupGloo.hpp includes this file but uses nothing from it.
#pragma once
#include "gloo/context.h"
