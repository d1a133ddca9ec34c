"""Control tables of the supported servo models: register addresses, sizes, signs and factory defaults.

Addresses and sizes are the manufacturers' (Dynamixel X-series e-manual, Feetech STS memory table).
The bus driver, the calibration and the emulated bus all read these tables, so an address is written
down exactly once.

Units the driver converts with (so the emulator and the driver agree on every number):
- positions: `ticks_per_rev` raw ticks per turn;
- velocities: `velocity_unit` rad/s per register unit (Dynamixel X: 0.229 rpm; STS3215: taken as
  1 tick/s, i.e. 2*pi/4096 rad/s);
- load: `load_register` reads `load_max` at full torque (Dynamixel: Present_Current at its factory
  Current_Limit; STS3215: Present_Load in 0.1 % units);
- torque limit: `torque_limit_register` written with `torque_limit_max` means full torque
  (Dynamixel: Goal_Current, effective in current-based position mode 5; STS3215: Torque_Limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from robot.servo.errors import UnknownRegister


@dataclass(frozen=True)
class Register:
    """One entry of a control table."""

    name: str
    address: int
    size: int  # bytes
    signed: bool = False
    sign_bit: int | None = None  # Feetech sign-magnitude bit; None means two's complement (Dynamixel)
    eeprom: bool = False  # writable only with torque off (and, on Feetech, Lock=0)
    readonly: bool = False  # the servo refuses writes (model number, present values)

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True)
class Model:
    """One servo model: its protocol, its model number (as a ping reports it) and its control table."""

    name: str
    protocol: str  # "dynamixel" | "feetech"
    model_number: int
    registers: dict[str, Register] = field(compare=False)
    baud_codes: dict[int, int] = field(compare=False)  # Baud_Rate register value -> bit/s
    ticks_per_rev: int = 4096
    velocity_unit: float = 2 * math.pi / 4096  # rad/s per Present_Velocity unit
    load_register: str = "Present_Current"
    load_max: int = 1000  # load_register at full torque
    current_max: int = 1000  # Present_Current at full torque
    torque_limit_register: str = "Goal_Current"
    torque_limit_max: int = 1000
    table_size: int = 256  # bytes of the control table (reads and writes must stay inside)
    defaults: dict[str, int] = field(default_factory=dict, compare=False)  # factory values

    def reg(self, name: str) -> Register:
        """The register called `name`; UnknownRegister (a KeyError) names the model and lists the known ones."""
        try:
            return self.registers[name]
        except KeyError:
            raise UnknownRegister(f"servo model {self.name} has no register {name!r} "
                                  f"(it has: {', '.join(self.registers)})") from None

    def baud_code(self, baud: int) -> int:
        """The Baud_Rate register value for `baud` bit/s; ValueError lists the rates this model supports."""
        for code, rate in self.baud_codes.items():
            if rate == baud:
                return code
        rates = ", ".join(str(r) for r in sorted(self.baud_codes.values()))
        raise ValueError(f"servo model {self.name} cannot run at {baud} bit/s (supported: {rates})")


def _table(*entries: Register) -> dict[str, Register]:
    return {r.name: r for r in entries}


def _x_series() -> dict[str, Register]:
    """Dynamixel X series (Protocol 2.0): two's complement for every signed register."""
    R = Register
    return _table(
        R("Model_Number", 0, 2, eeprom=True, readonly=True),
        R("Firmware_Version", 6, 1, eeprom=True, readonly=True),
        R("ID", 7, 1, eeprom=True),
        R("Baud_Rate", 8, 1, eeprom=True),
        R("Return_Delay_Time", 9, 1, eeprom=True),  # 2 us units
        R("Drive_Mode", 10, 1, eeprom=True),
        R("Operating_Mode", 11, 1, eeprom=True),
        R("Homing_Offset", 20, 4, signed=True, eeprom=True),
        R("Temperature_Limit", 31, 1, eeprom=True),
        R("Max_Position_Limit", 48, 4, eeprom=True),
        R("Min_Position_Limit", 52, 4, eeprom=True),
        R("Shutdown", 63, 1, eeprom=True),
        R("Torque_Enable", 64, 1),
        R("LED", 65, 1),
        R("Hardware_Error_Status", 70, 1, readonly=True),
        R("Position_D_Gain", 80, 2),
        R("Position_I_Gain", 82, 2),
        R("Position_P_Gain", 84, 2),
        R("Bus_Watchdog", 98, 1, signed=True),  # reads -1 after it fired
        R("Goal_Current", 102, 2, signed=True),
        R("Goal_Velocity", 104, 4, signed=True),
        R("Profile_Acceleration", 108, 4),
        R("Profile_Velocity", 112, 4),
        R("Goal_Position", 116, 4, signed=True),
        R("Moving", 122, 1, readonly=True),
        R("Present_Current", 126, 2, signed=True, readonly=True),
        R("Present_Velocity", 128, 4, signed=True, readonly=True),
        R("Present_Position", 132, 4, signed=True, readonly=True),
        R("Present_Input_Voltage", 144, 2, readonly=True),
        R("Present_Temperature", 146, 1, readonly=True),
    )


def _sts() -> dict[str, Register]:
    """Feetech STS3215: little-endian, sign-magnitude signed registers."""
    R = Register
    return _table(
        R("Firmware_Version", 0, 1, eeprom=True, readonly=True),  # firmware major version
        R("Model_Number", 3, 2, eeprom=True, readonly=True),
        R("ID", 5, 1, eeprom=True),
        R("Baud_Rate", 6, 1, eeprom=True),
        R("Return_Delay_Time", 7, 1, eeprom=True),  # 2 us units
        R("Min_Position_Limit", 9, 2, eeprom=True),
        R("Max_Position_Limit", 11, 2, eeprom=True),
        R("Max_Torque_Limit", 16, 2, eeprom=True),
        R("Phase", 18, 1, eeprom=True),  # keep bit 4 clear so positions read 0..4095
        R("P_Coefficient", 21, 1, eeprom=True),
        R("D_Coefficient", 22, 1, eeprom=True),
        R("I_Coefficient", 23, 1, eeprom=True),
        R("Protection_Current", 28, 2, eeprom=True),
        R("Homing_Offset", 31, 2, signed=True, sign_bit=11, eeprom=True),
        R("Operating_Mode", 33, 1, eeprom=True),
        R("Torque_Enable", 40, 1),
        R("Acceleration", 41, 1),
        R("Goal_Position", 42, 2, signed=True, sign_bit=15),
        R("Goal_Velocity", 46, 2, signed=True, sign_bit=15),
        R("Torque_Limit", 48, 2),  # 0.1 % of the maximum torque
        R("Lock", 55, 1),  # 0 while writing EEPROM, 1 after
        R("Present_Position", 56, 2, signed=True, sign_bit=15, readonly=True),
        R("Present_Velocity", 58, 2, signed=True, sign_bit=15, readonly=True),
        R("Present_Load", 60, 2, signed=True, sign_bit=10, readonly=True),  # 0.1 % of the maximum torque
        R("Present_Voltage", 62, 1, readonly=True),  # 0.1 V
        R("Present_Temperature", 63, 1, readonly=True),
        R("Moving", 66, 1, readonly=True),
        R("Present_Current", 69, 2, signed=True, sign_bit=15, readonly=True),  # 6.5 mA units
    )


DYNAMIXEL_BAUDS = {0: 9600, 1: 57600, 2: 115200, 3: 1_000_000, 4: 2_000_000, 5: 3_000_000, 6: 4_000_000,
                   7: 4_500_000}
FEETECH_BAUDS = {0: 1_000_000, 1: 500_000, 2: 250_000, 3: 128_000, 4: 115_200, 5: 76_800, 6: 57_600, 7: 38_400}
DYNAMIXEL_OPERATING_MODES = {0: "current", 1: "velocity", 3: "position", 4: "extended position",
                             5: "current-based position", 16: "PWM"}
DYNAMIXEL_RPM_UNIT = 0.229  # rpm per Present_Velocity unit


def _dynamixel(name: str, number: int, current_max: int, volts_x10: int) -> Model:
    defaults = {
        "Model_Number": number, "Firmware_Version": 52, "ID": 1, "Baud_Rate": 1, "Return_Delay_Time": 250,
        "Operating_Mode": 3, "Temperature_Limit": 70, "Max_Position_Limit": 4095, "Min_Position_Limit": 0,
        "Shutdown": 0b110100,  # overload, electrical shock, overheating
        "Position_P_Gain": 800, "Goal_Current": current_max, "Profile_Velocity": 0,
        "Present_Input_Voltage": volts_x10, "Present_Temperature": 30,
    }
    return Model(name, "dynamixel", number, _x_series(), DYNAMIXEL_BAUDS,
                 velocity_unit=DYNAMIXEL_RPM_UNIT * 2 * math.pi / 60, load_register="Present_Current",
                 load_max=current_max, current_max=current_max, torque_limit_register="Goal_Current",
                 torque_limit_max=current_max, table_size=661, defaults=defaults)


def _sts3215() -> Model:
    defaults = {
        "Firmware_Version": 3, "Model_Number": 777, "ID": 1, "Baud_Rate": 0, "Return_Delay_Time": 0,
        "Min_Position_Limit": 0, "Max_Position_Limit": 4095, "Max_Torque_Limit": 1000, "P_Coefficient": 32,
        "D_Coefficient": 32, "I_Coefficient": 0, "Protection_Current": 500, "Torque_Limit": 1000, "Lock": 1,
        "Present_Voltage": 74, "Present_Temperature": 30,
    }
    return Model("sts3215", "feetech", 777, _sts(), FEETECH_BAUDS, velocity_unit=2 * math.pi / 4096,
                 load_register="Present_Load", load_max=1000, current_max=500, torque_limit_register="Torque_Limit",
                 torque_limit_max=1000, table_size=256, defaults=defaults)


# XL430-W250 reports load (0.1 % units) at address 126 where the others report current; one name serves all.
MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        _dynamixel("xl330-m077", 1190, 1750, 50),
        _dynamixel("xl330-m288", 1200, 1750, 50),
        _dynamixel("xl430-w250", 1060, 1000, 120),
        _dynamixel("xm430-w350", 1020, 1193, 120),
        _sts3215(),
    )
}


def model_for(protocol: str, model_number: int) -> Model | None:
    """The model a ping's model number names on a `protocol` bus, or None if it is not one we know."""
    for model in MODELS.values():
        if model.protocol == protocol and model.model_number == model_number:
            return model
    return None
