// See gloo/context.h: the device and buffer types are only held through smart pointers.
#pragma once

namespace gloo::transport {
class Device;
class UnboundBuffer;
}  // namespace gloo::transport
