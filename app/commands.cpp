#include "app/commands.h"

#include "base/error.h"

namespace remat {

std::string recompute_policy(const Options& o) {
  if (!o.get_bool("grad-checkpoint")) return o.get("recompute");
  REMAT_REQUIRE(!o.given("recompute") || o.get("recompute") == "full",
                "--grad-checkpoint means --recompute full; it cannot go with --recompute " +
                    o.get("recompute"));
  return "full";
}

}  // namespace remat
